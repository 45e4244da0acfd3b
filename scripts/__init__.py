"""Scripts run as files (`python scripts/NAME.py`); a package so that tests import the ones
whose code they share (the zoo's coverage bar, the fuzzer's mutations)."""
