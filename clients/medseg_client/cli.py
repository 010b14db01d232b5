"""The ``medseg`` command: phantom, serve, segment, evaluate, mig, demo.

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
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from medseg.errors import MedsegError, one_line
from medseg.spec import SPEC

if TYPE_CHECKING:
    from medseg.server import ServerOptions


def cmd_phantom(args: argparse.Namespace) -> int:
    from medseg.phantom import REGIONS, generate
    from medseg.studies import write_phantom

    if args.region not in REGIONS:
        raise MedsegError(f"--region must be one of {', '.join(REGIONS)}; got {args.region!r}")
    ph = generate(args.seed, region=args.region, num_slices=args.slices)
    paths = write_phantom(ph, args.out, args.format)
    print(f"phantom seed {args.seed}: {ph.ct.shape[2]}x{ph.ct.shape[1]}x{ph.ct.shape[0]} voxels, spacing "
          f"{ph.spacing[2]:.3f}x{ph.spacing[1]:.3f}x{ph.spacing[0]:.3f} mm, {ph.region}, {ph.phase} phase, liver "
          f"{ph.liver_ml:.0f} mL in view, {len(ph.tumors)} tumor(s) -> {args.out}"
          f" ({len(paths)} files)")
    return 0


def serve_options(args: argparse.Namespace) -> ServerOptions:
    """The embedded server's options for ``medseg serve``: hardened unless told otherwise."""
    import secrets

    from medseg.server import ServerOptions, Tls

    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port),
                       ("--metrics-port", args.metrics_port)):
        if not 0 <= port <= 65535:
            raise MedsegError(f"{flag} must be a TCP port in 0..65535 (0: a free one), got {port}")
    extra: list[str] = []
    if args.flavor == "cuda":
        from medseg.flavors import cuda_memory_pool_args, require_cuda

        require_cuda()  # refuse here, with the reason, rather than as a model load failure in the server's log
        extra = cuda_memory_pool_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        raise MedsegError("--tls-cert and --tls-key go together (the server's certificate chain and its key, PEM)")
    tls = None
    if args.tls_cert is not None:
        for path, marker, what in ((args.tls_cert, b"CERTIFICATE-----", "a PEM certificate"),
                                   (args.tls_key, b"PRIVATE KEY-----", "a PEM private key")):
            if not path.is_file():
                raise MedsegError(f"TLS file not found: {path}")
            if marker not in path.read_bytes()[:1_000_000]:  # refused here, not as a server that fails to start
                raise MedsegError(f"{path} is not {what}")
        tls = Tls(args.tls_cert, args.tls_key)
    # the admin protocols are always closed: behind $MEDSEG_ADMIN_KEY, or a key nobody knows
    admin_key = os.environ.get("MEDSEG_ADMIN_KEY") or secrets.token_urlsafe(24)
    return ServerOptions(flavor=args.flavor, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, address=args.address, extra_args=extra, http=args.http,
                         admin_key=admin_key, tls=tls)


def cmd_serve(args: argparse.Namespace) -> int:
    from medseg.server import EmbeddedServer

    options = serve_options(args)
    server = EmbeddedServer(options)
    t0 = time.monotonic()

    def announce() -> None:
        http = f"HTTP {server.http_url}" if options.http else "HTTP off"
        admin = "admin APIs need $MEDSEG_ADMIN_KEY" if os.environ.get("MEDSEG_ADMIN_KEY") else "admin APIs closed"
        print(f"medseg serving {SPEC.ensemble.name} ({args.flavor} flavor): gRPC{'+TLS' if options.tls else ''} "
              f"{server.grpc_url}, {http}, {admin}; ready in {time.monotonic() - t0:.1f} s; Ctrl-C stops", flush=True)

    code = server.serve_until_signalled(announce)
    print("medseg server stopped", flush=True)
    return code


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


def summary(doc: dict[str, Any]) -> str:
    """A few human lines of a findings document."""
    f = doc["findings"]
    status = f.get("status", {"code": "ok", "reported": True, "reason": ""})
    scan = status.get("scan", {}).get("regions_mm", {})
    lines = [f"status: {status['code']}" + ("" if status["reported"] else " - NOTHING REPORTED") + f": {status['reason']}"
             + (f" (scan: {', '.join(f'{k} {v:.0f} mm' for k, v in scan.items())})" if scan else "")]
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg_client.evaluate import evaluate_to_dir, parse_label_map, summary_lines

    label_map = parse_label_map(args.label_map) if args.label_map else None
    doc = evaluate_to_dir(args.url, args.data, args.out, label_map=label_map, ignore_label=args.ignore_label,
                          limit=args.limit, model_name=args.model_name, timeout_s=args.timeout,
                          tenant_key=args.tenant_key, tls_ca=args.tls_ca)
    print(summary_lines(doc))
    print(f"wrote {args.out}/metrics.json, report.md, froc.png, dice.png and worst/")
    return 0


def cmd_mig(args: argparse.Namespace) -> int:
    from medseg import mig

    gpu, tenants = mig.load_tenants(args.tenants)
    layout = mig.plan(gpu, tenants)
    if args.mig_command == "plan":
        print(mig.describe(layout))
        print("\ncommands (as root on the GPU host):")
        print("\n".join("  " + c for c in mig.commands(layout, args.gpu)))
        return 0
    from medseg import mig_compose

    try:
        listing = args.devices.read_text()
    except OSError as e:
        raise mig.PlanError(f"cannot read {args.devices} (the output of `nvidia-smi -L`): {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise mig.PlanError(f"{args.devices} is not the text output of `nvidia-smi -L` (not UTF-8)") from e
    devices = mig.assign_devices(layout, mig.parse_nvidia_smi_l(listing), args.gpu)
    for path in mig_compose.write(layout, devices, args.out):
        print(f"wrote {path}")
    for name, d in devices.items():
        print(f"  {name}: {d.profile} on {d.uuid}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medseg_client.demo import run_demo

    return run_demo(args.out, args.seed)


def _int_in(lo: int, hi: int) -> Any:
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


def _seconds(text: str) -> float:
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="medseg", description="CT liver and liver-tumor segmentation on Triton")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic abdominal CT study with its ground truth")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    p.add_argument("--slices", type=_int_in(1, SPEC.max_input_shape[0]), default=None,
                   help="override the number of slices")
    p.add_argument("--region", default="abdomen",
                   help="the body region scanned: abdomen (default), chest_abdomen, abdomen_pelvis hold the liver; "
                        "chest, head, neck, pelvis, legs, no_liver hold none, liver_tip only its tip")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("serve", help="run the embedded Triton server on model_repository/")
    p.add_argument("--flavor", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--http", action="store_true", help="also serve Triton's HTTP API on --http-port (off by default)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve gRPC over TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="the TLS certificate's private key (PEM)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("segment", help="segment a DICOM series folder or a NIfTI file through the server")
    p.add_argument("-u", "--url", default="localhost:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("-m", "--model-name", default=SPEC.ensemble.name)
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds for the request")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--series", default=None, help="SeriesInstanceUID to read from a folder holding several")
    p.add_argument("--shared-memory", action="store_true",
                   help="on the server's host: pass the volume and labels through system shared memory, not gRPC")
    p.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, verifying the server with this CA (PEM)")
    p.add_argument("--tenant-key", default=os.environ.get("MEDSEG_TENANT_KEY"),
                   help="the tenant's key for a medseg gateway (default: $MEDSEG_TENANT_KEY; prefer the variable, "
                        "command lines are visible to other users)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("mig", help="MIG multi-tenant serving: plan a GPU's layout, write its compose file")
    msub = p.add_subparsers(dest="mig_command", required=True)
    q = msub.add_parser("plan", help="check the tenants' profiles fit one GPU; print the layout and nvidia-smi commands")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.set_defaults(func=cmd_mig)
    q = msub.add_parser("compose", help="write one Triton service per MIG instance and the tenants' gateway")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--devices", type=Path, required=True, help="the output of `nvidia-smi -L` after creating the layout")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.add_argument("--out", type=Path, default=Path("."), help="folder for docker-compose.mig.yml and gateway/")
    q.set_defaults(func=cmd_mig)

    p = sub.add_parser("evaluate", help="judge the served model on labelled data: an nnU-Net folder or DICOM series with SEG")
    p.add_argument("-u", "--url", default="localhost:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("-m", "--model-name", default=SPEC.ensemble.name)
    p.add_argument("data", type=Path, help="imagesTs/ + labelsTs/ (nnU-Net), or DICOM case folders each with a SEG")
    p.add_argument("--out", type=Path, required=True, help="report folder: metrics.json, report.md, froc.png, ...")
    p.add_argument("--label-map", nargs="+", default=None, metavar="NAME=V[,V]",
                   help="annotated values (SEG: segment numbers) of liver and tumor; default liver=1,2 tumor=2 "
                        "(SEG: by segment descriptions); without tumor= tumors count as not annotated")
    p.add_argument("--ignore-label", type=int, default=None, help="label value left out of every voxel measure")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds for each study's request")
    p.add_argument("--tls-ca", type=Path, default=None, help="connect over TLS, verifying the server with this CA (PEM)")
    p.add_argument("--tenant-key", default=os.environ.get("MEDSEG_TENANT_KEY"),
                   help="the tenant's key for a medseg gateway (default: $MEDSEG_TENANT_KEY)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="serve, segment an unseen phantom, compare with its ground truth, stop")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=5002)
    p.set_defaults(func=cmd_demo)
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
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its line already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_ERROR
    command = args.command + (f" {args.mig_command}" if args.command == "mig" else "")
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
