"""The registration authority's use cases that are not requests of an agent: bulk provisioning
(`provision.py`) and the operator's actions (`operators.py`). Enrollment, bootstrap and recovery are
still `registration_app/service.py` and `registration_app/recovery.py`."""
