"""`steerserve` command line.

    steerserve serve [--model PATH] [vLLM engine/server flags] [steerserve flags]

Every flag of `vllm serve` works unchanged (vLLM's own parser; `--help` lists them all).
steerserve adds --admin-key, --vectors-dir, --saes-dir, --max-steering-features,
--max-steering-dynamic, --max-steering-conditions, --presets,
--default-steering, --max-request-body-bytes, --max-inline-floats, --experiments, --database-url,
--enable-steering-decoding, --enable-steering-readout, --steering-topk-sae and
--max-steering-topk. With no model it serves the
built-in demo model (`demo/model/`, a small Llama trained on the synthetic corpus of
`demo/corpus.py`; nothing is downloaded) with its vectors in `vectors/`.

    steerserve experiments report NAME [--version N] [--plot out.png] [--json]
    steerserve experiments list

read the experiment store directly (`--database-url`, as the server's).
"""

from __future__ import annotations

import argparse
import os
import sys

from .demo import (
    DEMO_MAX_CONDITIONS,
    DEMO_MAX_DYNAMIC,
    DEMO_MAX_FEATURES,
    DEMO_MODEL,
    DEMO_MODEL_DIR,
    DEMO_SAES_DIR,
    DEMO_TOPK_SAE,
    SHIPPED_VECTORS_DIR,
    demo_model,
)

USAGE = """usage: steerserve serve [--model PATH] [vLLM flags] [steerserve flags] (see --help)
       steerserve experiments {report,list} ... (see steerserve experiments --help)
       steerserve vectors {info,convert,train,eval} ... (see steerserve vectors --help)
       steerserve features {info,search} ... (see steerserve features --help)"""


def add_steering_args(parser: argparse.ArgumentParser) -> None:
    from .experiments.store import DEFAULT_DATABASE_URL
    from .settings import DEFAULT_MAX_BODY_BYTES

    group = parser.add_argument_group("steerserve")
    group.add_argument(
        "--admin-key",
        default=os.environ.get("STEERSERVE_ADMIN_KEY"),
        help="Bearer key for /v1/admin/* routes (or STEERSERVE_ADMIN_KEY); off without it.",
    )
    group.add_argument(
        "--vectors-dir",
        default=os.environ.get("STEERSERVE_VECTORS_DIR") or str(SHIPPED_VECTORS_DIR),
        help="Directory of named steering vectors (.safetensors / .gguf).",
    )
    group.add_argument(
        "--saes-dir",
        default=os.environ.get("STEERSERVE_SAES_DIR"),
        help="Directory of named sparse autoencoders (our .safetensors, Gemma Scope, SAELens, "
        "sparsify); the demo model's own SAE when serving the demo model.",
    )
    group.add_argument(
        "--max-steering-features",
        type=int,
        default=None,
        help="SAE feature clamps/scales one request may apply per layer (0, the default, "
        f"turns those ops off; {DEMO_MAX_FEATURES} for the demo model). Each costs a dot "
        "product per token and layer for every request.",
    )
    group.add_argument(
        "--max-steering-dynamic",
        type=int,
        default=None,
        help="Scheduled and RMS-relative adds (vector entries with `schedule` / `relative`) "
        f"one request may use (0, the default, turns them off; {DEMO_MAX_DYNAMIC} for the "
        "demo model). Each costs an axpy per token and layer for every request.",
    )
    group.add_argument(
        "--max-steering-conditions",
        type=int,
        default=None,
        help="Request-level conditions (spec `conditions`, CAST) one request may use; "
        f"entries gate on them with `when` (0, the default, turns them off; "
        f"{DEMO_MAX_CONDITIONS} for the demo model). Gated scheduled or RMS-relative adds "
        "also need --max-steering-dynamic.",
    )
    group.add_argument(
        "--steering-condition-layers",
        default=None,
        help="Comma-separated layers conditions may read (default: every layer). Summing "
        "prompt rows costs every request at each layer it runs at; the layers your "
        "conditions use are enough.",
    )
    group.add_argument(
        "--steering-feature-layers",
        default=None,
        help="Comma-separated layers where feature clamps/scales run (default: every layer). "
        "They cost every request at each layer they run at; an engine whose SAEs read a few "
        "layers is faster with just those.",
    )
    group.add_argument(
        "--steering-topk-sae",
        default=None,
        help="An SAE of --saes-dir whose top-k active features per token requests may read "
        '(readout entry {"sae", "top_k"}; the demo SAE for the demo model). Costs one '
        "copy of the stream at its layer per step; its full encoder runs only on the rows "
        "of requests that ask. It cannot be replaced or deleted while the server runs.",
    )
    group.add_argument(
        "--max-steering-topk",
        type=int,
        default=None,
        help="The largest top_k a request may ask for (default 64).",
    )
    group.add_argument(
        "--presets", default=None, help="JSON/YAML file mapping preset names to steering specs."
    )
    group.add_argument(
        "--default-steering",
        default=None,
        help="Spec applied to every request before its own (inline JSON or a JSON/YAML "
        'file); a request opts out with "steering": {"default": false}.',
    )
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="Larger request bodies get 413.",
    )
    group.add_argument(
        "--max-inline-floats",
        type=int,
        default=None,
        help="Most floats of inline vector data one request may carry (413 beyond; "
        "default 4194304).",
    )
    group.add_argument(
        "--experiments",
        default=None,
        help="JSON/YAML file of A/B experiments, stored (new versions where changed) at "
        "start; admin routes manage them at run time.",
    )
    group.add_argument(
        "--database-url",
        default=os.environ.get("STEERSERVE_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help="Where experiments, assignments and feedback are kept: sqlite:///PATH (default "
        f"{DEFAULT_DATABASE_URL}) or postgresql+psycopg://... to share it between replicas.",
    )
    group.add_argument(
        "--enable-steering-decoding",
        action="store_true",
        help="Allow layer-fused / contrastive decoding (costs a few percent for every "
        "request: each layer's sampled rows are kept).",
    )
    group.add_argument(
        "--enable-steering-readout",
        action="store_true",
        help="Allow `readout` specs (per-token projections of the residual stream in "
        "responses; every layer then reads for every request, a few percent).",
    )


def _steering_config(args: argparse.Namespace) -> None:
    """Put steerserve's engine settings into vLLM's additional_config (merged, not replaced)."""
    extra = dict(args.additional_config or {})
    mine = dict(extra.get("steerserve", {}))
    mine.setdefault("vectors_dir", args.vectors_dir)
    demo = str(getattr(args, "model", "")) == str(DEMO_MODEL_DIR)
    saes = args.saes_dir or (str(DEMO_SAES_DIR) if demo else None)
    if saes:
        mine.setdefault("saes_dir", saes)
    features = args.max_steering_features
    if features is None and demo:
        features = DEMO_MAX_FEATURES
    if features is not None:
        mine["max_features"] = features
    dynamic = args.max_steering_dynamic
    if dynamic is None and demo:
        dynamic = DEMO_MAX_DYNAMIC
    if dynamic is not None:
        mine["max_dynamic"] = dynamic
    conditions = args.max_steering_conditions
    if conditions is None and demo:
        conditions = DEMO_MAX_CONDITIONS
    if conditions is not None:
        mine["max_conditions"] = conditions
    for flag, key in (
        ("steering_feature_layers", "feature_layers"),
        ("steering_condition_layers", "condition_layers"),
    ):
        given = getattr(args, flag)
        if given:
            try:
                mine[key] = [int(x) for x in given.split(",")]
            except ValueError:
                name = "--" + flag.replace("_", "-")
                sys.exit(f"steerserve serve: {name} takes layers such as 4,8")
    if args.enable_steering_decoding:
        mine["decoding"] = True
    if args.enable_steering_readout:
        mine["readout"] = True
    if demo:  # the playground's decoding and readout views work out of the box
        mine.setdefault("decoding", True)
        mine.setdefault("readout", True)
    topk_sae = args.steering_topk_sae or (DEMO_TOPK_SAE if demo and not args.saes_dir else None)
    if topk_sae:
        mine["topk_sae"] = topk_sae
    if args.max_steering_topk is not None:
        mine["max_topk"] = args.max_steering_topk
    extra["steerserve"] = mine
    args.additional_config = extra


def engine_argv(argv: list[str]) -> tuple[list[str], int | None]:
    """`serve`'s vLLM flags with its defaults filled in, and the KV budget it chose (None:
    the user's flags or vLLM's own defaults decide)."""
    from steering.engine import memory

    argv = list(argv)
    demo = not memory.has_flag(argv, "--model") and not (argv and not argv[0].startswith("-"))
    if demo:
        argv = [*argv, "--model", str(demo_model())]
        # The demo model is tiny (trained on 128-token blocks, 512 positions): keep the
        # engine's context to match.
        if not memory.has_flag(argv, "--max-model-len"):
            argv += ["--max-model-len", "512"]
        if not memory.has_flag(argv, "--served-model-name"):
            argv += ["--served-model-name", DEMO_MODEL]
    # On CPU, a KV budget that starts beside other processes (memory.py), unless chosen.
    default = memory.SMALL_KV_BYTES if demo else memory.SERVE_KV_BYTES
    budget = memory.cpu_kv_flags(argv, default)
    return argv + budget, default if budget else None


def serve(argv: list[str]) -> None:
    from steering.engine import memory
    from steering.engine import openai_server as vllm_api

    from .settings import (
        ServerSettings,
        SettingsError,
        load_default_spec,
        load_experiments,
        load_presets,
    )

    # The steering hooks live in the V1 model runner (docs/design.md#dependencies-and-platforms).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    parser = vllm_api.arg_parser("steerserve serve")
    add_steering_args(parser)
    argv, kv_default = engine_argv(argv)
    args = parser.parse_args(argv)
    vllm_api.validate_args(args)
    _steering_config(args)
    try:
        settings = ServerSettings(
            # Keys are ours to check (OpenAI-shaped 401); vLLM's own check stays off.
            api_keys=[k for k in (args.api_key or [os.environ.pop("VLLM_API_KEY", "")]) if k],
            admin_key=args.admin_key,
            presets_path=args.presets,
            presets=load_presets(args.presets),
            default_spec=load_default_spec(args.default_steering),
            max_body_bytes=args.max_request_body_bytes,
            max_inline_floats=args.max_inline_floats,
            experiments=load_experiments(args.experiments),
            database_url=args.database_url,
        )
    except SettingsError as e:
        sys.exit(f"steerserve serve: {e}")
    args.api_key = None
    os.environ.pop("VLLM_API_KEY", None)

    async def extend(app, engine):
        from .app import extend_app

        try:
            return extend_app(app, engine, settings)
        except ValueError as e:  # a preset or default spec that does not fit the model
            raise SystemExit(f"steerserve serve: {e}") from None

    import uvloop

    try:
        uvloop.run(vllm_api.run_server(args, extend))
    except RuntimeError as e:  # vLLM's "Engine core initialization failed" (cause logged above)
        hint = memory.start_failure_hint(kv_default)
        sys.exit(f"steerserve serve: the engine did not start: {e}\n{hint}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    elif command == "experiments":
        from .experiments.cli import main as experiments_main

        experiments_main(rest)
    elif command == "vectors":
        from .vector_commands import main as vectors_main

        vectors_main(rest)
    elif command == "features":
        from .feature_commands import main as features_main

        features_main(rest)
    else:
        sys.exit(
            f"steerserve: unknown command {command!r} (known: serve, experiments, vectors, "
            "features)"
        )


if __name__ == "__main__":
    main()
