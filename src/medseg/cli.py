"""The server-side and offline ``medseg`` commands: phantom, serve, import, evaluate, mig, node, jobs, demo.

The client's ``medseg`` command (``medseg_client.cli``) finds them through the ``medseg.commands`` entry point;
it handles their errors and exit statuses. Each handler is glue: the work is in the modules it imports.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.paths import MODEL_REPOSITORY
from medseg_client.cli import add_connection_args, int_in
from medseg_client.errors import MedsegError
from medseg_client.protocol import GRPC_PORT, HTTP_PORT, METRICS_PORT
from medseg_client.spec import SPEC

if TYPE_CHECKING:
    from medseg.serving.server import ServerOptions


def cmd_phantom(args: argparse.Namespace) -> int:
    from medseg.synth.phantom import REGIONS, generate
    from medseg_client.io.studies import write_phantom

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

    from medseg.serving.server import ServerOptions, Tls

    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port),
                       ("--metrics-port", args.metrics_port)):
        if not 0 <= port <= 65535:
            raise MedsegError(f"{flag} must be a TCP port in 0..65535 (0: a free one), got {port}")
    extra: list[str] = []
    if args.flavor == "cuda":
        from medseg.serving.flavors import cuda_memory_pool_args, require_cuda

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
    if not (args.model_repository / SPEC.ensemble.name).is_dir() and not served_models(args.model_repository):
        raise MedsegError(f"--model-repository {args.model_repository}: expected a model repository (model folders, "
                          f"{SPEC.ensemble.name} or imported ones with a card.json), found none")
    return ServerOptions(flavor=args.flavor, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, address=args.address, extra_args=extra, http=args.http,
                         admin_key=admin_key, tls=tls, model_repository=args.model_repository.resolve())


def served_models(repository: Path) -> list[str]:
    """The ensembles a repository holds: the shipped liver model and every imported one (a folder with a card)."""
    from medseg_client.card import CARD_FILE

    shipped = [SPEC.ensemble.name] if (repository / SPEC.ensemble.name).is_dir() else []
    return shipped + sorted(p.parent.name for p in repository.glob(f"*/{CARD_FILE}"))


def cmd_serve(args: argparse.Namespace) -> int:
    from medseg.serving.server import EmbeddedServer
    from medseg.serving.supervisor import Supervisor

    options = serve_options(args)
    server = EmbeddedServer(options)
    t0 = time.monotonic()

    def announce() -> None:
        http = f"HTTP {server.http_url}" if options.http else "HTTP off"
        admin = "admin APIs need $MEDSEG_ADMIN_KEY" if os.environ.get("MEDSEG_ADMIN_KEY") else "admin APIs closed"
        models = ", ".join(served_models(options.model_repository))
        print(f"medseg serving {models} ({args.flavor} flavor): gRPC{'+TLS' if options.tls else ''} "
              f"{server.grpc_url}, {http}, {admin}; ready in {time.monotonic() - t0:.1f} s; Ctrl-C stops", flush=True)

    code = Supervisor(server).serve_until_signalled(announce)
    print("medseg server stopped", flush=True)
    return code


def cmd_node(args: argparse.Namespace) -> int:
    import signal

    from medseg.node.config import load_config
    from medseg.node.service import Node

    node = Node(load_config(args.config))
    signal.signal(signal.SIGTERM, lambda *_: node.stop_event.set())
    node.start()
    try:
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    print("medseg node stopped", flush=True)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from medseg.node.config import load_config
    from medseg.node.jobs import jobs_command

    print(jobs_command(load_config(args.config), args.action, args.job, args.state, args.limit))
    return 0


LABEL_CODES_HELP = "JSON of DICOM codes (and display names, colours) per label name, for the SEG"
IMPORT_REPOSITORY_HELP = "where the model goes (default: this checkout's repository)"


def cmd_import(args: argparse.Namespace) -> int:
    if args.import_command == "monai-bundle":
        from medseg.importers.monai_bundle import import_monai_bundle

        card = import_monai_bundle(args.bundle, args.name, args.model_repository, label_codes=args.label_codes)
    else:
        from medseg.importers.nnunet import import_nnunet

        if not 0 < args.step <= 1:
            raise MedsegError(f"--step must be in (0, 1], got {args.step}")
        card = import_nnunet(args.results, args.name, args.model_repository, folds=args.fold,
                             checkpoint=args.checkpoint, mirroring=not args.no_mirroring, step=args.step,
                             label_codes=args.label_codes, orientation=args.orientation)
    uncoded = card.uncoded()
    if uncoded:
        print(f"note: labels without DICOM codes: {', '.join(uncoded)}; `medseg segment` writes no SEG for this model "
              "until --label-codes gives them")
    print(f"imported {card.name}; serve it with `medseg serve --model-repository {args.model_repository}`")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.accuracy.evaluate import evaluate_to_dir, parse_label_map, summary_lines

    label_map = parse_label_map(args.label_map) if args.label_map else None
    doc = evaluate_to_dir(args.url, args.data, args.out, label_map=label_map, ignore_label=args.ignore_label,
                          limit=args.limit, model_name=args.model_name, timeout_s=args.timeout,
                          tenant_key=args.tenant_key, tls_ca=args.tls_ca)
    print(summary_lines(doc))
    print(f"wrote {args.out}/metrics.json, report.md, froc.png, dice.png and worst/")
    return 0


def cmd_mig(args: argparse.Namespace) -> int:
    from medseg.deploy import mig

    gpu, tenants = mig.load_tenants(args.tenants)
    layout = mig.plan(gpu, tenants)
    if args.mig_command == "plan":
        print(mig.describe(layout))
        print("\ncommands (as root on the GPU host):")
        print("\n".join("  " + c for c in mig.commands(layout, args.gpu)))
        return 0
    from medseg.deploy import mig_compose

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
    from medseg.accuracy.demo import run_demo

    return run_demo(args.out, args.seed)


def add_commands(sub: Any) -> None:
    """Add phantom, serve, import, evaluate, mig, node, jobs and demo to the ``medseg`` command's subparsers."""
    p = sub.add_parser("phantom", help="write a synthetic abdominal CT study with its ground truth")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=("dicom", "nifti"), default="dicom")
    p.add_argument("--slices", type=int_in(1, SPEC.max_input_shape[0]), default=None,
                   help="override the number of slices")
    p.add_argument("--region", default="abdomen",
                   help="the body region scanned: abdomen (default), chest_abdomen, abdomen_pelvis hold the liver; "
                        "chest, head, neck, pelvis, legs, no_liver hold none, liver_tip only its tip")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("serve", help="run the embedded Triton server on model_repository/")
    p.add_argument("--flavor", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument("--http", action="store_true", help="also serve Triton's HTTP API on --http-port (off by default)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve gRPC over TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="the TLS certificate's private key (PEM)")
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                   help="the model repository to serve (default: this checkout's; imported models live beside the "
                        "shipped one, see `medseg import`)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="make a hospital's own model servable: an nnU-Net v2 results folder or a MONAI bundle")
    isub = p.add_subparsers(dest="import_command", required=True)
    q = isub.add_parser("nnunet", help="an nnU-Net v2 results folder (<trainer>__<plans>__3d_fullres) -> a served model")
    q.add_argument("results", type=Path, help="the results folder: plans.json, dataset.json, fold_*/checkpoint_*.pth")
    q.add_argument("--name", required=True, help="the served model's name (lower-case letters, digits, underscores)")
    q.add_argument("--fold", nargs="+", default=None, help="folds to use, averaged (default: every fold_N folder)")
    q.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    q.add_argument("--no-mirroring", action="store_true",
                   help="no test-time mirroring (8x faster on the CPU; nnU-Net's predictor mirrors by default)")
    q.add_argument("--step", type=float, default=0.5, help="sliding-window tile step as a fraction of the patch")
    q.add_argument("--label-codes", type=Path, default=None, help=LABEL_CODES_HELP)
    q.add_argument("--orientation", default="LPS",
                   help="how the training images were stored (x, y, z axis directions): LPS (DICOM converted by "
                        "SimpleITK, medseg's grid; the default) or RAS (nibabel's canonical, TotalSegmentator's)")
    q.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY, help=IMPORT_REPOSITORY_HELP)
    q.set_defaults(func=cmd_import)
    q = isub.add_parser("monai-bundle", help="a MONAI bundle (configs/inference.json, configs/metadata.json, "
                                             "models/model.pt) -> a served model")
    q.add_argument("bundle", type=Path, help="the bundle's folder")
    q.add_argument("--name", required=True, help="the served model's name (lower-case letters, digits, underscores)")
    q.add_argument("--label-codes", type=Path, default=None, help=LABEL_CODES_HELP)
    q.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY, help=IMPORT_REPOSITORY_HELP)
    q.set_defaults(func=cmd_import)

    p = sub.add_parser("mig", help="MIG multi-tenant serving: plan a GPU's layout, write its compose file")
    msub = p.add_subparsers(dest="mig_command", required=True)
    q = msub.add_parser("plan", help="check the tenants' profiles fit one GPU; print the layout and nvidia-smi commands")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.set_defaults(func=cmd_mig, command_name="mig plan")
    q = msub.add_parser("compose", help="write one Triton service per MIG instance and the tenants' gateway")
    q.add_argument("tenants", type=Path, help="tenants YAML file")
    q.add_argument("--devices", type=Path, required=True, help="the output of `nvidia-smi -L` after creating the layout")
    q.add_argument("--gpu", type=int, default=0, help="GPU index on the host")
    q.add_argument("--out", type=Path, default=Path("."), help="folder for docker-compose.mig.yml and gateway/")
    q.set_defaults(func=cmd_mig, command_name="mig compose")

    p = sub.add_parser("evaluate", help="judge the served model on labelled data: an nnU-Net folder or DICOM series with SEG")
    add_connection_args(p, timeout_help="seconds for each study's request")
    p.add_argument("data", type=Path, help="imagesTs/ + labelsTs/ (nnU-Net), or DICOM case folders each with a SEG")
    p.add_argument("--out", type=Path, required=True, help="report folder: metrics.json, report.md, froc.png, ...")
    p.add_argument("--label-map", nargs="+", default=None, metavar="NAME=V[,V]",
                   help="annotated values (SEG: segment numbers) of liver and tumor; default liver=1,2 tumor=2 "
                        "(SEG: by segment descriptions); without tumor= tumors count as not annotated")
    p.add_argument("--ignore-label", type=int, default=None, help="label value left out of every voxel measure")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("node", help="the PACS node: receive studies by DICOM C-STORE, route them to served models, "
                                    "send SEG, SR and preview back (config: docs/pacs-node.md)")
    p.add_argument("--config", type=Path, required=True, help="the node's YAML configuration")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("jobs", help="the PACS node's jobs: list, show one, retry a failed one")
    p.add_argument("action", nargs="?", choices=("list", "show", "retry"), default="list")
    p.add_argument("job", nargs="?", type=int, default=None, help="the job's number (show, retry)")
    p.add_argument("--config", type=Path, required=True, help="the node's YAML configuration")
    p.add_argument("--state", default=None, help="list only jobs in this state (queued, running, segmented, sent, failed)")
    p.add_argument("--limit", type=int_in(1, 100000), default=50, help="list the newest N jobs (default 50)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("demo", help="serve, segment an unseen phantom, compare with its ground truth, stop")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=5002)
    p.set_defaults(func=cmd_demo)
