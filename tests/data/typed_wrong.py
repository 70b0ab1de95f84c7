"""Checked by mypy in tests/test_stubs.py: three mistakes the stubs must catch."""

import shoal

sb = shoal.Sandbox.create(timeout="300")  # not an int
sb.exec("ls", workdir=3)  # not a str
rc: str = sb.exec("ls").wait()  # wait() returns int
