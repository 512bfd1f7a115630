"""The user-server side: bootstrap, enroll, renew, recover, and the renewal daemon."""
