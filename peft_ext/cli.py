"""The ``peft-ext`` command line: fit / eval / generate / compose / compose-plan / inspect / lint / card / doctor / bake
/ memory / demo.

Every command reads and writes ordinary PEFT adapter folders. Commands whose product is an adapter folder (``fit``,
``compose``, ``bake``) take ``--out DIR`` and write their JSON report into it; the others write their JSON report to
``--out FILE``. A failure prints one line, ``peft-ext <command>: error: <reason>``, and exits with 2 (1 when ``lint``
or ``doctor`` find problems); ``PEFT_EXT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

METHODS = ("gate", "modulated-lora", "modulated-pissa")


def _write_report(path, report: dict) -> None:
    if path:
        from .io import write_json

        write_json(path, report)


def _print_json(report: dict) -> None:
    print(json.dumps(report, indent=2, default=str))


# -- loading ----------------------------------------------------------------------------------------------------------
def _add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("base model")
    group.add_argument("--model", required=required, help="local folder or Hub id of a causal LM")
    group.add_argument("--revision", help="base model revision (commit, tag or branch) to load and record")
    group.add_argument("--tokenizer-revision", help="tokenizer revision (default: --revision)")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    group.add_argument("--load-in-4bit", action="store_true", help="quantize the base to nf4 with bitsandbytes")
    group.add_argument("--load-in-8bit", action="store_true", help="quantize the base to int8 with bitsandbytes")
    group.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _load_model(args):
    from .loading import load_base_model

    return load_base_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                           revision=args.revision, trust_remote_code=args.trust_remote_code, device=args.device)


def _load_tokenizer(args):
    from .loading import load_tokenizer

    return load_tokenizer(args.model, revision=args.tokenizer_revision or args.revision,
                          trust_remote_code=args.trust_remote_code)


def _attach(model, adapter: str, strict: bool):
    """The base model with ``adapter`` loaded, after the fingerprint check (another architecture is always an error)."""
    from .loading import load_adapter_model
    from .provenance import check_base

    check_base(model, adapter, strict=strict)
    return load_adapter_model(model, adapter)


def _recorded_base(adapter: str) -> str:
    from .loading import read_adapter_config

    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter} does not record its base model; pass --model")
    return base


# -- fit --------------------------------------------------------------------------------------------------------------
def _method_config(args):
    from .tuners.loggate import GateConfig
    from .tuners.mlora import ModulatedLoraConfig
    from .tuners.mpissa import ModulatedPissaConfig

    targets = args.target_modules if args.target_modules != ["all-linear"] else "all-linear"
    if args.method == "gate":
        layers = args.layers if args.layers == "all" or args.layers.startswith("last:") else [
            int(i) for i in args.layers.split(",")]
        return GateConfig(num_gates=None if args.gates == 0 else args.gates, max_log_gate=args.max_log_gate,
                          layers=layers, score_batches=args.score_batches, selection=args.selection,
                          selection_seed=args.seed)
    band = tuple(args.layer_range) if args.layer_range else None
    if args.method == "modulated-lora":
        return ModulatedLoraConfig(r=args.rank, alpha=args.alpha if args.alpha is not None else float(args.rank),
                                   target_modules=targets, layer_range=band, coefficient=args.coefficient)
    return ModulatedPissaConfig(r=args.rank, selection=args.pissa_selection, target_modules=targets, layer_range=band,
                                coefficient=args.coefficient)


def _fit_into(args, folder: Path, location: str) -> dict:
    """Fit ``args.method`` on ``args.train`` and save adapter, provenance, report and card (naming ``location``, where
    users will load it from) into ``folder``."""
    from .analysis import write_card
    from .data import load_examples, make_batches
    from .fit import fit_adapter
    from .io import write_json
    from .provenance import fingerprint, write_provenance

    if args.layers != "all" and not args.layers.startswith("last:"):
        if not all(part.strip().isdigit() for part in args.layers.split(",")):
            raise ValueError(f"--layers {args.layers!r}: use all, last:N or comma-separated block indices")
    config = _method_config(args)  # option errors before anything is loaded
    tokenizer = _load_tokenizer(args)
    data = {"train": args.train, **({"eval": args.eval} if args.eval else {}),
            **({"rejected": args.rejected} if args.rejected else {})}
    batches = {role: make_batches(tokenizer, load_examples(path, tokenizer, args.chat_template), args.batch_size,
                                  seed=args.seed if role == "train" else None)
               for role, path in data.items()}  # every row is checked before anything is written
    base = _load_model(args)
    base_fingerprint = fingerprint(base)
    config.revision = args.revision
    model, report = fit_adapter(base, config, batches["train"], batches.get("eval"), batches.get("rejected"),
                                steps=args.steps, lr=args.lr, eval_every=args.eval_every, patience=args.patience,
                                seed=args.seed, progress=not args.quiet)
    report.update({"method": args.method, "base_model": args.model, "revision": args.revision,
                   "quantization": "nf4" if args.load_in_4bit else "int8" if args.load_in_8bit else None})
    model.save_pretrained(folder)
    write_provenance(folder, base_fingerprint, args.model, args.revision, data, report)
    write_json(folder / "fit_report.json", report)
    write_card(folder, location=location)
    return report


def _fit(args) -> int:
    from .io import atomic_directory

    with atomic_directory(args.out, overwrite=args.overwrite) as folder:
        report = _fit_into(args, folder, args.out)
    _write_report(args.report, report)
    train, held = report["train"], report["eval"]
    print(f"fitted {args.method} in {report['train_seconds']:.1f} s ({report['steps_run']} steps); "
          f"train NLL {train['nll_before']:.4f} -> {train['nll_after']:.4f}"
          + (f"; eval NLL {held['nll_before']:.4f} -> {held['nll_after']:.4f}, exact match "
             f"{held['exact_match_before']:.1%} -> {held['exact_match_after']:.1%}" if held else ""))
    print(f"adapter: {args.out}")
    return 0


# -- eval / generate --------------------------------------------------------------------------------------------------
def _eval(args) -> int:
    from .data import ChoiceExample, evaluate, evaluate_choices, load_eval_rows, make_batches

    tokenizer = _load_tokenizer(args)
    rows = load_eval_rows(args.data, tokenizer, args.chat_template)
    model = _load_model(args)
    if args.adapter:
        model = _attach(model, args.adapter, args.strict)
    if isinstance(rows[0], ChoiceExample):
        score = lambda: evaluate_choices(model, tokenizer, rows, args.batch_size)  # noqa: E731
    else:
        batches = make_batches(tokenizer, rows, args.batch_size)
        score = lambda: evaluate(model, batches)  # noqa: E731
    report = {"data": args.data, "kind": "multiple_choice" if isinstance(rows[0], ChoiceExample) else "completion",
              "adapter": args.adapter}
    if args.adapter:
        report["adapter_metrics"] = score()
        if not args.no_base:
            with model.disable_adapter():
                report["base_metrics"] = score()
    else:
        report["base_metrics"] = score()
    _write_report(args.out, report)
    for label in ("base_metrics", "adapter_metrics"):
        if label in report:
            print(f"{label.split('_')[0]:>8}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in report[label].items()))
    return 0


def _generate(args) -> int:
    import torch

    from .data import load_examples

    tokenizer = _load_tokenizer(args)
    prompts = list(args.prompt or [])
    if args.data:
        prompts += [example.prompt for example in load_examples(args.data, tokenizer, args.chat_template)]
    if not prompts:
        raise ValueError("nothing to generate from: pass --prompt TEXT (repeatable) or --data FILE")
    model = _load_model(args)
    if args.adapter:
        model = _attach(model, args.adapter, args.strict)
    torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        sample = args.temperature > 0
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=sample,
                                       temperature=args.temperature if sample else None, top_p=None, top_k=None,
                                       pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        outputs.append({"prompt": prompt, "completion": completion})
        print(f"{prompt}{completion}")
    _write_report(args.out, {"adapter": args.adapter, "temperature": args.temperature, "outputs": outputs})
    return 0


# -- compose ----------------------------------------------------------------------------------------------------------
def _composition_kind(adapters: list[str]) -> str:
    from .bake import BAKEABLE_TYPES
    from .loading import read_adapter_config

    types = {read_adapter_config(a).get("peft_type", "?") for a in adapters}
    if types == {"LOGGATE"}:
        return "gates"
    if types <= set(BAKEABLE_TYPES):
        return "lowrank"
    raise ValueError(f"cannot compose {' with '.join(sorted(types))}: compose log-gate controllers with each other, "
                     f"or low-rank adapters ({', '.join(BAKEABLE_TYPES)}) with each other")


def _plan(args) -> dict:
    from .compose import plan_lowrank, plan_saved_gates

    if len(args.weights) != len(args.adapters):
        raise ValueError(f"{len(args.adapters)} adapters but {len(args.weights)} weights; pass one weight per adapter")
    if _composition_kind(args.adapters) == "gates":
        return {"kind": "gates", **plan_saved_gates(args.adapters, args.weights, args.budget)}
    if args.budget is not None:
        raise ValueError("--budget bounds log-gates; low-rank adapters are summed without a bound")
    return {"kind": "lowrank", **plan_lowrank(list(zip(args.adapters, args.weights)))}


def _print_plan(plan: dict) -> None:
    print(f"{plan['kind']} composition of {len(plan['adapters'])} adapters, weights {plan['weights']}")
    if plan["kind"] == "gates":
        print(f"  union {plan['union_gates']} gates, clipped {plan['clipped_fraction']:.1%} at ±{plan['budget']}, "
              f"sign conflicts {plan['sign_conflicts']}")
        for pair in plan["pairs"]:
            print(f"  {pair['adapters'][0]} / {pair['adapters'][1]}: jaccard {pair['jaccard']:.3f}, "
                  f"cosine {pair['cosine']:+.3f}")
    else:
        for pair in plan["pairs"]:
            print(f"  {pair['adapters'][0]} / {pair['adapters'][1]}: {pair['shared_modules']} shared modules, mean "
                  f"|delta cosine| {pair['mean_abs_delta_cosine']:.3f}, mean cos² of principal angles: columns "
                  f"{pair['mean_column_cosine_squared']:.3f}, rows {pair['mean_row_cosine_squared']:.3f}")
    for line in plan["blocking"]:
        print(f"  BLOCKING: {line}")
    for line in plan["warnings"]:
        print(f"  warning: {line}")


def _compose_plan(args) -> int:
    plan = _plan(args)
    _print_plan(plan)
    _write_report(args.out, plan)
    return 0


def _compose(args) -> int:
    from peft import PeftModel

    from .bake import bake
    from .compose import compose_gates
    from .io import atomic_directory, write_json
    from .provenance import fingerprint, write_provenance

    plan = _plan(args)
    _print_plan(plan)
    if plan["blocking"] and not args.force:
        raise ValueError(f"composition refused: {'; '.join(plan['blocking'])} (pass --force to compose anyway)")
    args.model = args.model or _recorded_base(args.adapters[0])
    with atomic_directory(args.out, overwrite=args.overwrite) as folder:
        base = _load_model(args)
        write_provenance(folder, fingerprint(base), args.model, args.revision)
        if plan["kind"] == "gates":
            names = [f"input{i}" for i in range(len(args.adapters))]
            model = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0])
            for name, adapter in zip(names[1:], args.adapters[1:]):
                model.load_adapter(adapter, adapter_name=name)
            plan.update(compose_gates(model, names, args.weights, args.budget, adapter_name="default", force=args.force))
            model.save_pretrained(folder, selected_adapters=["default"])
        else:
            bake(base, list(zip(args.adapters, args.weights))).save_pretrained(folder)
        write_json(folder / "compose_plan.json", plan)
    print(f"composed adapter: {args.out}")
    return 0


# -- inspect / lint / card / doctor / bake ----------------------------------------------------------------------------
def _inspect(args) -> int:
    from .analysis import inspect_adapters

    report = inspect_adapters(args.adapters)
    _write_report(args.out, report)
    for info in report["adapters"]:
        params = info["parameters"]
        print(f"{info['adapter']}: {info['family']} ({info['peft_type']}) on {info['base_model']}, "
              f"{params['trainable']:,} trainable of {params['saved_elements']:,} saved elements")
        if "problem" in info:
            print(f"  problem: {info['problem']}")
        for block in info.get("gates", {}).get("per_block", []):
            print(f"  {block['block']:<32} selected {block['selected']:>6}  non-zero {block['nonzero']:>6}  "
                  f"max|s| {block['max_abs']:.4f}")
        for path, target in info.get("targets", {}).items():
            print(f"  {path:<48} rank {target['rank']:>4}  |dW|_F {target['delta_norm']:.4g}")
    for pair in report["overlap"]:
        summary = {k: v for k, v in pair.items() if k not in ("adapters", "interfering_modules")}
        print(f"overlap {pair['adapters'][0]} / {pair['adapters'][1]}: {summary}")
    return 0


def _lint(args) -> int:
    from .analysis import lint_adapter

    report = {adapter: lint_adapter(adapter) for adapter in args.adapters}
    _write_report(args.out, report)
    failing = ("error", "warning") if args.strict else ("error",)
    failed = False
    for adapter, findings in report.items():
        print(f"{adapter}: {'clean' if not findings else f'{len(findings)} findings'}")
        for finding in findings:
            print(f"  {finding['level']}: {finding['code']}: {finding['message']}")
            failed |= finding["level"] in failing
    return 1 if failed else 0


def _card(args) -> int:
    from .analysis import write_card

    path = write_card(args.adapter)
    _write_report(args.out, {"card": str(path)})
    print(f"wrote {path}")
    return 0


def _doctor(args) -> int:
    from .analysis import doctor

    report = doctor(_load_model(args), _load_tokenizer(args), max_log_gate=args.max_log_gate)
    _write_report(args.out, report)
    _print_json(report)
    return 1 if report["problems"] else 0


def _parse_round(text: str) -> tuple[str, float]:
    path, separator, value = text.rpartition(":")
    try:
        if not separator or not path:
            raise ValueError
        return path, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADAPTER:COEFFICIENT, e.g. round1:1.33") from None


def _bake(args) -> int:
    from .bake import bake
    from .io import atomic_directory, write_json
    from .provenance import fingerprint, write_provenance

    args.model = args.model or _recorded_base(args.rounds[0][0])
    with atomic_directory(args.out, overwrite=args.overwrite) as folder:
        base = _load_model(args)
        write_provenance(folder, fingerprint(base), args.model, args.revision)
        baked = bake(base, args.rounds, max_rank=args.max_rank, energy=args.energy, compress=not args.no_compress)
        baked.save_pretrained(folder)
        config = baked.peft_config["default"]
        report = {"rounds": config.rounds, "ranks": config.ranks, "relative_error": config.relative_error}
        write_json(folder / "bake_report.json", report)
    ranks = list(report["ranks"].values())
    print(f"baked {len(report['rounds'])} rounds into {len(ranks)} modules (rank {min(ranks)}-{max(ranks)}, largest "
          f"relative error {max(report['relative_error'].values(), default=0.0):.2e}): {args.out}")
    return 0


def _demo(args) -> int:
    from .demo import format_report, run_demo

    report = run_demo(out_dir=args.out_dir, num_gates=args.gates, steps=args.steps, seed=args.seed)
    print(format_report(report))
    _write_report(args.out, report)
    return 0 if report["reload_exact"] else 1


def _add_fit_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """The options of ``fit`` (shared with ``memory add`` / ``memory update``, where fitting is optional)."""
    parser.add_argument("--train", required=required, help="training JSONL (prompt/completion, instruction/response, "
                        "question/answer, text or messages rows)")
    parser.add_argument("--eval", help="held-out JSONL: NLL before/after, early stopping and best-checkpoint restore")
    parser.add_argument("--rejected", help="JSONL of rejected completions (PiSSA cho_rej_min_std calibration)")
    parser.add_argument("--method", required=required, choices=METHODS)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations on --eval")
    parser.add_argument("--patience", type=int, help="stop after this many evaluations without improvement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default="auto", choices=("auto", "none"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    gates = parser.add_argument_group("log-gates (--method gate)")
    gates.add_argument("--gates", type=int, default=5000, help="sparse gate budget; 0 trains every gate (dense)")
    gates.add_argument("--max-log-gate", type=float, default=0.05)
    gates.add_argument("--layers", default="all", help="all, last:N or comma-separated block indices")
    gates.add_argument("--score-batches", type=int, default=16)
    gates.add_argument("--selection", default="gradient", choices=("gradient", "per_layer", "random"))
    low_rank = parser.add_argument_group("low-rank (--method modulated-lora / modulated-pissa)")
    low_rank.add_argument("--rank", type=int, default=8)
    low_rank.add_argument("--alpha", type=float, help="LoRA alpha (default: rank, i.e. scale 1)")
    low_rank.add_argument("--coefficient", type=float, default=1.0, help="default runtime coefficient c")
    low_rank.add_argument("--target-modules", nargs="+", default=["all-linear"])
    low_rank.add_argument("--layer-range", nargs=2, type=float, metavar=("LO", "HI"))
    low_rank.add_argument("--pissa-selection", default="s_only",
                          choices=("s_only", "act_only", "wanda", "cho_rej_min_std"))


# -- memory -----------------------------------------------------------------------------------------------------------
def _memory_adapter(args, store):
    """``(adapter folder, cleanup)`` for memory add/update: ``--adapter`` as given, or fitted from ``--train``."""
    if args.adapter and args.train:
        raise ValueError("pass either --adapter (register a folder) or --train (fit one), not both")
    if args.train:
        if not (args.model and args.method):
            raise ValueError("fitting a memory needs --model and --method")
        staging = Path(tempfile.mkdtemp(dir=store.adapters / ".staging"))
        try:
            _fit_into(args, staging, f"{store.adapters}/<the memory's adapter_sha256>")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, lambda: shutil.rmtree(staging, ignore_errors=True)
    return args.adapter, lambda: None


def _memory(args) -> int:
    from .memory import MemoryStore

    store = MemoryStore(args.store)
    operation = args.operation
    metadata = json.loads(args.metadata) if getattr(args, "metadata", None) else None
    if operation in ("add", "update"):
        if operation == "add" and not (args.adapter or args.train):
            raise ValueError("memory add needs --adapter DIR or --train FILE (with --model and --method)")
        adapter, cleanup = _memory_adapter(args, store) if (args.adapter or args.train) else (None, lambda: None)
        try:
            if operation == "add":
                result = store.add(args.namespace, args.text, adapter, tags=args.tags or (), metadata=metadata)
            else:
                result = store.update(args.id, text=args.text, tags=args.tags, adapter=adapter, metadata=metadata)
        finally:
            cleanup()
    elif operation == "list":
        result = store.list(args.namespace, include_deleted=args.all)
    elif operation == "show":
        result = store.get(args.id, args.version)
    elif operation == "search":
        result = store.search(args.query, args.namespace, args.k)
    elif operation in ("delete", "restore"):
        result = getattr(store, operation)(args.id)
    elif operation == "purge":
        if not args.yes:
            raise ValueError("purge removes every version and its files for good; pass --yes")
        result = store.purge(args.id)
    elif operation == "rollback":
        result = store.rollback(args.id, args.version)
    elif operation == "audit":
        result = store.collect_garbage() if args.collect_garbage else store.audit()
    elif operation == "export":
        result = store.export(args.namespace, args.folder, overwrite=args.overwrite)
    elif operation == "import":
        result = store.import_(args.folder)
    else:
        result = _serve(args, store)
    _print_json(result)
    _write_report(args.out, result)
    return 1 if operation == "audit" and not args.collect_garbage and not result["ok"] else 0


def _serve(args, store) -> dict:
    from .data import load_examples
    from .serving import MemoryServer

    tokenizer = _load_tokenizer(args)
    examples = load_examples(args.data, tokenizer, args.chat_template) if args.operation == "eval" else None
    server = MemoryServer(_load_model(args), store, args.namespace, args.k, args.weighting, args.budget)
    if args.operation == "generate":
        return server.generate(tokenizer, args.query, args.prompt, args.max_new_tokens)
    return server.evaluate(tokenizer, examples, args.query)


def _add_memory_parser(commands) -> None:
    memory = commands.add_parser("memory", help="versioned, audited adapter memories: add, search, serve, ...")
    operations = memory.add_subparsers(dest="operation", required=True)

    def operation(name: str, help_text: str) -> argparse.ArgumentParser:
        command = operations.add_parser(name, help=help_text)
        command.add_argument("--store", required=True, help="the store folder (created on first use)")
        command.add_argument("--out", help="also write the JSON output here")
        command.set_defaults(handler=_memory)
        return command

    for name in ("add", "update"):
        command = operation(name, f"{name} a memory: register --adapter DIR or fit one with --train")
        if name == "add":
            command.add_argument("--namespace", required=True)
            command.add_argument("--text", required=True, help="what the memory is about (what search matches)")
        else:
            command.add_argument("id")
            command.add_argument("--text")
        command.add_argument("--tags", nargs="+")
        command.add_argument("--metadata", help="a JSON object")
        command.add_argument("--adapter", help="an adapter folder to register (copied into the store)")
        _add_model_options(command, required=False)
        _add_fit_options(command, required=False)
    listing = operation("list", "current memories (deleted ones with --all)")
    listing.add_argument("--namespace")
    listing.add_argument("--all", action="store_true")
    show = operation("show", "one memory at its current or a given version")
    show.add_argument("id")
    show.add_argument("--version", type=int)
    search = operation("search", "memories ranked for a query (BM25 over text and tags)")
    search.add_argument("query")
    search.add_argument("--namespace")
    search.add_argument("-k", type=int, default=5)
    for name, help_text in (("delete", "soft delete"), ("restore", "undo a soft delete"),
                            ("purge", "remove every version and its files for good")):
        command = operation(name, help_text)
        command.add_argument("id")
        if name == "purge":
            command.add_argument("--yes", action="store_true")
    rollback = operation("rollback", "make an earlier version current again (validated first)")
    rollback.add_argument("id")
    rollback.add_argument("--version", type=int, required=True)
    audit = operation("audit", "verify the event chain, the tables, files and hashes (exit 1 on problems)")
    audit.add_argument("--collect-garbage", action="store_true", help="remove unreferenced leftovers instead")
    export = operation("export", "write a namespace and its adapters to a folder")
    export.add_argument("--namespace", required=True)
    export.add_argument("folder")
    export.add_argument("--overwrite", action="store_true")
    importing = operation("import", "add the memories of an exported folder")
    importing.add_argument("folder")
    for name in ("generate", "eval"):
        command = operation(name, "retrieve, compose and attach memories for each request, then " +
                            ("generate" if name == "generate" else "score a JSONL file against the base model"))
        _add_model_options(command)
        command.add_argument("--namespace")
        command.add_argument("-k", type=int, default=3, help="memories composed per request")
        command.add_argument("--weighting", default="uniform", choices=("uniform", "score"))
        command.add_argument("--budget", type=float, help="log-gate bound of the composition")
        command.add_argument("--chat-template", default="auto", choices=("auto", "none"))
        if name == "generate":
            command.add_argument("--query", required=True)
            command.add_argument("--prompt", help="what to complete (default: the query)")
            command.add_argument("--max-new-tokens", type=int, default=32)
        else:
            command.add_argument("--data", required=True)
            command.add_argument("--query", help="one query for every row (default: each row's prompt)")


# -- parser -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ext", description="Adapter families for Hugging Face PEFT.")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit an adapter on JSONL data and save it with provenance and a model card")
    _add_model_options(fit)
    _add_fit_options(fit, required=True)
    fit.add_argument("--out", required=True, help="adapter folder to write (must not exist or be empty)")
    fit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is complete")
    fit.add_argument("--report", help="also write the fit report here")
    fit.set_defaults(handler=_fit)

    evaluate = commands.add_parser("eval", help="completion NLL and exact match, or multiple-choice accuracy")
    _add_model_options(evaluate)
    evaluate.add_argument("--data", required=True, help="JSONL; rows with 'choices' are scored as multiple choice")
    evaluate.add_argument("--adapter", help="adapter folder (the base model is evaluated too unless --no-base)")
    evaluate.add_argument("--no-base", action="store_true")
    evaluate.add_argument("--strict", action="store_true", help="refuse an adapter fitted on other base weights")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--chat-template", default="auto", choices=("auto", "none"))
    evaluate.add_argument("--out", help="write the JSON report here")
    evaluate.set_defaults(handler=_eval)

    generate = commands.add_parser("generate", help="generate completions with or without an adapter")
    _add_model_options(generate)
    generate.add_argument("--adapter")
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    generate.add_argument("--data", help="JSONL whose rows' prompts are completed")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--strict", action="store_true")
    generate.add_argument("--chat-template", default="auto", choices=("auto", "none"))
    generate.add_argument("--out")
    generate.set_defaults(handler=_generate)

    for name, handler, help_text in (("compose", _compose, "compose adapters into a new adapter folder"),
                                     ("compose-plan", _compose_plan, "what composing would do; writes no adapter")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--adapters", nargs="+", required=True)
        command.add_argument("--weights", nargs="+", type=float, required=True)
        command.add_argument("--budget", type=float, help="log-gate bound of the composition (default: largest input)")
        command.add_argument("--out", required=name == "compose",
                             help="adapter folder" if name == "compose" else "JSON report")
        if name == "compose":
            _add_model_options(command, required=False)
            command.add_argument("--force", action="store_true", help="compose despite blocking problems")
            command.add_argument("--overwrite", action="store_true")
        command.set_defaults(handler=handler)

    inspect = commands.add_parser("inspect", help="type, targets, parameters, gate histogram / ranks, overlap")
    inspect.add_argument("adapters", nargs="+")
    inspect.add_argument("--out")
    inspect.set_defaults(handler=_inspect)

    lint = commands.add_parser("lint", help="NaN/inf, saturated or single-layer gates, unpinned revision, no fingerprint")
    lint.add_argument("adapters", nargs="+")
    lint.add_argument("--strict", action="store_true", help="warnings fail too")
    lint.add_argument("--out")
    lint.set_defaults(handler=_lint)

    card = commands.add_parser("card", help="write the adapter's model card (README.md)")
    card.add_argument("adapter")
    card.add_argument("--out")
    card.set_defaults(handler=_card)

    doctor = commands.add_parser("doctor", help="check a base model: blocks, dtype, tokenizer, bnb, one forward")
    _add_model_options(doctor)
    doctor.add_argument("--max-log-gate", type=float, default=0.05)
    doctor.add_argument("--out")
    doctor.set_defaults(handler=_doctor)

    bake = commands.add_parser("bake", help="fold kept rounds (ADAPTER:COEFFICIENT ...) into one history bake")
    _add_model_options(bake, required=False)
    bake.add_argument("--rounds", nargs="+", type=_parse_round, required=True, metavar="ADAPTER:COEFFICIENT")
    bake.add_argument("--out", required=True)
    bake.add_argument("--max-rank", type=int)
    bake.add_argument("--energy", type=float)
    bake.add_argument("--no-compress", action="store_true")
    bake.add_argument("--overwrite", action="store_true")
    bake.set_defaults(handler=_bake)

    _add_memory_parser(commands)

    demo = commands.add_parser("demo", help="steer a tiny model with a log-gate controller, offline (~1 min on CPU)")
    demo.add_argument("--out-dir", help="where the base model and adapter are written (default: a temp dir)")
    demo.add_argument("--gates", type=int, default=64, help="sparse gate budget (default 64)")
    demo.add_argument("--steps", type=int, default=150, help="fit steps (default 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="also write the JSON report here")
    demo.set_defaults(handler=_demo)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 600 else text[:600] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line, no traceback: the reason is in the message
        if os.environ.get("PEFT_EXT_DEBUG"):
            raise
        print(f"peft-ext {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
