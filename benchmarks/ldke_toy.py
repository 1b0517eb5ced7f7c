"""LDKE on the toy world (issue: the LDKE algorithm). See ``python benchmarks/ldke_toy.py --help``."""

from ldke_peft.bench.toy import main

if __name__ == "__main__":
    raise SystemExit(main())
