"""bench/slapd_txn.py, the reproducer of slapd's crash under LDAP transactions, sends what it says: every
process's transactions reach a real slapd, committed, and it says whether slapd is still there. (Its long
runs, which kill slapd 2.5.13 with `--way raw`, are not part of the suite: PERFORMANCE.md.)"""

from __future__ import annotations

from bench import slapd_txn


def test_the_reproducer_commits_every_transaction_of_each_process_and_reports_slapd_alive(capsys):
    assert slapd_txn.main(["--procs", "2", "--rounds", "25", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "alive: 50 committed, 0 refused" in out
    assert "slapd survived 1 of 1 runs" in out
