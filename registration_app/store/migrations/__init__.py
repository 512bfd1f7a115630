"""Alembic's script folder (env.py, versions/): a package so that the wheel lists and ships it."""
