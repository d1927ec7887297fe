"""``python -m tests.integration [--regenerate] [CASE ...]``: run the cases, or rewrite their references."""
import argparse
import sys
import tempfile

from .runner import case_names, compare, regenerate, run_case


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.integration")
    p.add_argument("cases", nargs="*", help=f"default: all ({', '.join(case_names())})")
    p.add_argument("--regenerate", action="store_true", help="rewrite the reference files from this build")
    args = p.parse_args()
    names = args.cases or case_names()
    with tempfile.TemporaryDirectory() as work:
        if args.regenerate:
            regenerate(names, work)
            return 0
        failed = 0
        for name in names:
            problems = compare(name, run_case(name, work))
            failed += bool(problems)
            print(f"{name}: {'FAIL ' + '; '.join(problems) if problems else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
