"""The ``medseg`` command. The client installs ``segment``; the full project (``medseg``) adds phantom, serve,
evaluate, mig and demo through the ``medseg.commands`` entry point group (``medseg.cli``).

No command prints a traceback; every outcome is an exit status and at most one line on stderr:

- 0: done (1: ``medseg demo`` ran but missed its accuracy targets); ``medseg evaluate`` exits 0 whatever its
  figures: a case it cannot read or that the server refuses is an error in its report (and a line on stderr
  beside its progress bar), the run goes on;
- 1: ``medseg segment`` read and judged the study but can report nothing (not a CT, no liver in view, a body
  region this model does not read, an implausible or unsure result): its outputs are written (empty labels,
  findings.json with the status and its reason, the preview saying it) and one line on stderr names the status;
- 2: an expected error: bad arguments, a refused input, an unreachable server, a file that cannot be read
  or written. One line, ``medseg <command>: error: <what>``; a longer message (a server's startup log)
  goes to a log file that the line names;
- 3: an internal error (a bug): ``medseg <command>: internal error (<ExceptionType> in <function>, <file>:<line>);
  details in <log>``, the traceback in a new owner-only file under ``$MEDSEG_LOG_DIR`` (default
  ``~/.cache/medseg/logs/``), named by command, time and process id; where no log can be written the line says
  why. Neither quotes the exception's message: a library's message can quote a header value;
- 130: interrupted (Ctrl-C).

Outputs are written all or nothing (``medseg segment`` stages them), whatever the exit. Libraries' warnings
and log records are not shown (pydicom's quote header values, which may be patient identifiers), nor gRPC's
C-core log lines (``GRPC_VERBOSITY=NONE`` unless set): their failures come back as medseg's errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from medseg_client.errors import MedsegError, one_line
from medseg_client.protocol import DEFAULT_URL, shared_memory_kind
from medseg_client.spec import SPEC

COMMANDS_GROUP = "medseg.commands"  # entry points: ``add_commands(subparsers)`` of other distributions


def cmd_segment(args: argparse.Namespace) -> int:
    from medseg_client.segment import segment_to_dir

    doc = segment_to_dir(args.url, args.input, args.out, args.model_name, args.timeout, args.series,
                         shared_memory=args.shared_memory, tenant_key=args.tenant_key, tls_ca=args.tls_ca,
                         admin_key=os.environ.get("MEDSEG_ADMIN_KEY"))
    print(summary(doc))
    print(f"wrote {args.out}/labels.nii.gz and findings.json")
    status = doc["findings"]["status"]
    if not status["reported"]:  # the study was read and judged: the answer is that nothing can be reported
        print(f"medseg segment: nothing reported ({status['code']}): {status['reason']}", file=sys.stderr)
        return EXIT_NOTHING_REPORTED
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from medseg_client.client import SegmentationClient

    with SegmentationClient(args.url, timeout_s=args.timeout, tenant_key=args.tenant_key, tls_ca=args.tls_ca,
                            admin_key=os.environ.get("MEDSEG_ADMIN_KEY")) as session:
        cards = session.models()
    if args.json:
        print(json.dumps([json.loads(c.to_json()) for c in cards], indent=2))
        return 0
    for card in cards:
        print(f"{card.name} v{card.version} ({card.source.get('kind', '?')}): {card.description}")
        for lab in card.labels[1:]:
            coded = f"{lab.type.meaning} ({lab.type.scheme} {lab.type.value})" if lab.type else "no DICOM code"
            print(f"  {lab.value} {lab.name}: {coded}")
    if not cards:
        print("no medseg models loaded")
    return 0 if cards else EXIT_NOTHING_REPORTED


def summary(doc: dict[str, Any]) -> str:
    """A few human lines of a findings document."""
    f = doc["findings"]
    status = f.get("status", {"code": "ok", "reported": True, "reason": ""})
    scan = status.get("scan", {}).get("regions_mm", {})
    lines = [f"status: {status['code']}" + ("" if status["reported"] else " - NOTHING REPORTED") + f": {status['reason']}"
             + (f" (scan: {', '.join(f'{k} {v:.0f} mm' for k, v in scan.items())})" if scan else "")]
    if "labels" in f:  # an imported model: what it labelled, class by class
        lines.extend(f"{c['name']}: {c['volume_ml']:.1f} mL in {c['components']} component(s)" for c in f["labels"])
        return "\n".join(lines)
    if status["reported"]:
        lines.append(f"liver: {f['liver']['volume_ml']:.0f} mL"
                     + ("" if status.get("liver", {}).get("cut_off", "none") == "none" else " in view (partial)")
                     + f"; {len(f['tumors'])} tumor(s), burden {f['tumor_burden_ml']:.2f} mL")
    for t in f["tumors"]:
        conf = "" if t.get("confidence") is None else f", confidence {t['confidence']:.2f}"
        lines.append(f"  tumor {t['id']}: {t['volume_ml']:.2f} mL, longest axial diameter "
                     f"{t['longest_axial_diameter_mm']:.1f} mm, mean {t['mean_hu']:.0f} HU{conf}, "
                     f"centre (LPS) {', '.join(f'{v:.1f}' for v in t['centroid_lps_mm'])} mm")
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in doc["timings_s"].items()))
    return "\n".join(lines)


def int_in(lo: int, hi: int) -> Any:
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in {lo}..{hi}, got {value}")
        return value
    return parse


def shared_memory_arg(text: str) -> str | None:
    """An argparse type: a shared-memory kind (``medseg_client.protocol.shared_memory_kind``)."""
    try:
        return shared_memory_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one ``--help`` away), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def add_connection_args(p: argparse.ArgumentParser, timeout_help: str) -> None:
    """How a command reaches the server: address, model, timeout, TLS and the gateway's tenant key."""
    p.add_argument("-u", "--url", default=DEFAULT_URL, help="gRPC HOST:PORT of the server")
    p.add_argument("-m", "--model-name", "--model", default=SPEC.ensemble.name,
                   help=f"the served model (default {SPEC.ensemble.name}; `medseg models` lists them)")
    p.add_argument("--timeout", type=seconds, default=300.0, help=timeout_help)
    p.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, verifying the server with this CA (PEM)")
    p.add_argument("--tenant-key", default=os.environ.get("MEDSEG_TENANT_KEY"),
                   help="the tenant's key for a medseg gateway (default: $MEDSEG_TENANT_KEY; prefer the variable, "
                        "command lines are visible to other users)")


def build_parser() -> argparse.ArgumentParser:
    """The client's commands, then those the installed distributions add (``medseg.commands`` entry points)."""
    ap = _Parser(prog="medseg", description="CT liver and liver-tumor segmentation on Triton")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a DICOM series folder or a NIfTI file through the server")
    add_connection_args(p, timeout_help="seconds for the request")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--series", default=None, help="SeriesInstanceUID to read from a folder holding several")
    p.add_argument("--shared-memory", nargs="?", const="system", default=None, metavar="system|cuda[:N]",
                   type=shared_memory_arg,
                   help="on the server's host: pass the volume and labels through shared memory, not gRPC: system "
                        "(the default when given alone) or CUDA on GPU N (needs cuda-python)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("models", help="list the models a server serves: names, versions, labels")
    p.add_argument("-u", "--url", default=DEFAULT_URL, help="gRPC HOST:PORT of the server")
    p.add_argument("--timeout", type=seconds, default=30.0, help="seconds for each call")
    p.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, verifying the server with this CA (PEM)")
    p.add_argument("--tenant-key", default=os.environ.get("MEDSEG_TENANT_KEY"),
                   help="the tenant's key for a medseg gateway (default: $MEDSEG_TENANT_KEY)")
    p.add_argument("--json", action="store_true", help="the cards as JSON")
    p.set_defaults(func=cmd_models)

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return ap


EXIT_NOTHING_REPORTED, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
LOG_DIR_ENV = "MEDSEG_LOG_DIR"
MAX_LINE = 300  # characters of an error message quoted on the one line


def log_dir() -> Path:
    """Where internal errors' tracebacks go: ``$MEDSEG_LOG_DIR``, else ``~/.cache/medseg/logs``."""
    return Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "medseg" / "logs")


def write_log(command: str, text: str) -> Path:
    """``text`` in a new file (owner-only) under ``log_dir()``, named by command, time and pid; OSError if it
    cannot be written."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    stem = f"medseg-{command.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):  # several errors in one second of one process: one file each
        path = folder / (f"{stem}.log" if n == 0 else f"{stem}-{n}.log")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    raise FileExistsError(f"{folder}: no free log file name for {stem}")


def _expected_error(command: str, e: BaseException) -> str:
    """The one line of an expected error. A message of several lines is joined when short; when long (a server's
    startup log) its first line is kept and the whole goes to a log file."""
    if isinstance(e, OSError) and e.strerror:
        message = e.strerror + (f": {e.filename}" if e.filename is not None else "")
    else:
        message = str(e) or type(e).__name__
    lines = [line for line in message.strip().splitlines() if line.strip()]
    joined = " ".join(message.split())
    if len(lines) <= 1 or len(joined) <= MAX_LINE:
        return f"medseg {command}: error: {joined}"
    first = " ".join(lines[0].split()).rstrip(" :")
    try:
        return f"medseg {command}: error: {first}; {len(lines) - 1} more lines in {write_log(command, message + chr(10))}"
    except OSError as log_error:
        return f"medseg {command}: error: {first}; {len(lines) - 1} more lines not logged ({log_error.strerror or log_error})"


def _frames(e: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(e.__traceback__))


def _where(e: BaseException) -> str:
    """Where ``e`` was raised: the innermost frame's function, file name and line."""
    frames = _frames(e)
    if not frames:
        return ""
    f = frames[-1]
    return f" in {f.name}, {Path(f.filename).name}:{f.lineno}"


def _redacted_traceback(e: BaseException) -> str:
    """The traceback of ``e`` and the exceptions chained to it: frames (file, line, function, code) and exception
    types, never their messages: a library's message can quote what it read (a header value, a patient's name)."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    parts = []
    for exc in reversed(chain):
        parts.append("Traceback (most recent call last):\n" + "".join(traceback.format_list(_frames(exc)))
                     + f"{type(exc).__module__}.{type(exc).__qualname__} (message left out)\n")
    return "\nwhich led to:\n\n".join(parts)


def _internal_error(command: str, e: BaseException) -> str:
    """The one line of an internal error: its type and where it was raised, never its message (it may quote
    patient data); the traceback, redacted the same way, goes to a new owner-only log file."""
    head = f"medseg {command}: internal error ({type(e).__name__}{_where(e)})"
    try:
        path = write_log(command, f"medseg {command}: internal error at {time.strftime('%Y-%m-%d %H:%M:%S %z')}, "
                                  f"medseg {SPEC.version}, Python {sys.version.split()[0]}\n\n"
                                  + _redacted_traceback(e))
    except OSError as log_error:
        return f"{head}; no log written ({one_line(log_error.strerror or str(log_error), MAX_LINE)})"
    return f"{head}; details in {path}"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except Exception as e:  # an installed distribution's commands cannot be loaded
        print(_internal_error("", e), file=sys.stderr)
        return EXIT_INTERNAL
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its line already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_ERROR
    command = getattr(args, "command_name", None) or args.command  # e.g. "mig plan"
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs to stderr itself; errors come back as ours
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # libraries' log records (nibabel's header complaints, pydicom's) stay unshown
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"medseg {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MedsegError, OSError) as e:  # refused input, unreachable server, unreadable or unwritable file
        print(_expected_error(command, e), file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: one line here, the traceback in the log
        print(_internal_error(command, e), file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        logging.disable(disabled)


if __name__ == "__main__":
    raise SystemExit(main())
