"""Running a CLI entry point in-process, and what its stderr must look like when it refuses."""

from __future__ import annotations

from collections.abc import Callable


def call(main: Callable, argv: list, capsys) -> tuple[int, str, str]:
    """Run a CLI entry point in-process; (exit code, stdout, stderr). argparse errors raise SystemExit."""
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress bars)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, prog: str, *fragments) -> str:
    """stderr is exactly one line, starting with ``prog``, holding every fragment, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"{prog}: "), line
    for fragment in fragments:
        assert str(fragment) in line, f"{fragment!r} not in {line!r}"
    return line
