"""The ``peft-ext`` commands through their entry point: exit codes, JSON reports, files written, clear errors."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_ext import GateConfig, ModulatedLoraConfig, bake, compose_gates
from peft_ext.cli import main
from peft_ext.data import Example, evaluate, evaluate_choices, load_eval_rows, make_batches
from peft_ext.loading import load_base_model, load_tokenizer
from peft_ext.provenance import fingerprint
from peft_ext.tiny import save_tiny

CLI = Path(sys.executable).parent / "peft-ext"  # the installed console script


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny base model and a learnable toy task (sums) split into train and held-out files."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "base")
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    random.Random(0).shuffle(rows)
    write_jsonl(root / "train.jsonl", rows[:80])
    write_jsonl(root / "eval.jsonl", rows[80:])
    return root


def run(*args, expect=0):
    code = main([str(a) for a in args])
    assert code == expect, (args, code)


def fit_args(work, method, out, *extra):
    return ["fit", "--model", work / "base", "--train", work / "train.jsonl", "--eval", work / "eval.jsonl",
            "--method", method, "--out", out, "--quiet", "--steps", "40", *extra]


@pytest.fixture(scope="module")
def adapters(work):
    """Adapters fitted through the CLI: {name: folder}."""
    specs = {
        "gates": ("gate", "--gates", "64", "--lr", "2e-2", "--max-log-gate", "0.5"),
        "gates_random": ("gate", "--gates", "64", "--selection", "random", "--lr", "2e-2", "--max-log-gate", "0.5"),
        "mlora": ("modulated-lora", "--rank", "4", "--lr", "1e-2"),
        "mpissa": ("modulated-pissa", "--rank", "4", "--lr", "1e-2", "--pissa-selection", "wanda"),
    }
    folders = {}
    for name, (method, *extra) in specs.items():
        folders[name] = work / name
        run(*fit_args(work, method, folders[name], *extra))
    return folders


# -- fit --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gates", "mlora", "mpissa"])
def test_fit_writes_an_adapter_with_provenance_card_and_report(name, adapters, work):
    folder = adapters[name]
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                                  "provenance.json", "fit_report.json"}
    report = json.loads((folder / "fit_report.json").read_text())
    assert report["peft_type"] == json.loads((folder / "adapter_config.json").read_text())["peft_type"]
    for key in ("selection_seconds", "train_seconds", "peak_memory_mb", "trainable_parameters", "steps_run"):
        assert key in report
    assert report["train"]["nll_after"] < report["train"]["nll_before"]
    assert report["eval"]["nll_after"] < report["eval"]["nll_before"]
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["fingerprint"] == fingerprint(load_base_model(str(work / "base")))
    assert len(provenance["data"]["train"]["sha256"]) == 64
    card = (folder / "README.md").read_text()
    assert "import peft_ext" in card and str(folder) in card and "## Limitations" in card
    # the saved adapter is a plain PEFT folder that reproduces what was fitted
    model = PeftModel.from_pretrained(load_base_model(str(work / "base")), folder)
    tokenizer = load_tokenizer(str(work / "base"))
    rows = load_eval_rows(work / "eval.jsonl", tokenizer)
    assert evaluate(model, make_batches(tokenizer, rows, 16))["nll"] == pytest.approx(report["eval"]["nll_after"],
                                                                                     rel=1e-5)


def test_fit_then_eval_beats_the_base_on_fp32_and_int8_and_4bit_fit_matches_the_fingerprint(adapters, work, tmp_path):
    run("eval", "--model", work / "base", "--adapter", adapters["mlora"], "--data", work / "eval.jsonl",
        "--out", tmp_path / "eval.json")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["kind"] == "completion"
    assert report["adapter_metrics"]["nll"] < report["base_metrics"]["nll"] - 0.3
    run("eval", "--model", work / "base", "--load-in-8bit", "--adapter", adapters["mlora"], "--data",
        work / "eval.jsonl", "--out", tmp_path / "eval8.json")
    int8 = json.loads((tmp_path / "eval8.json").read_text())
    assert int8["adapter_metrics"]["nll"] == pytest.approx(report["adapter_metrics"]["nll"], abs=0.05)
    assert int8["adapter_metrics"]["nll"] != report["adapter_metrics"]["nll"]  # the base really was quantized
    assert int8["adapter_metrics"]["nll"] < int8["base_metrics"]["nll"] - 0.3
    run(*fit_args(work, "gate", tmp_path / "q", "--gates", "32", "--load-in-4bit", "--steps", "5"))
    quantized = json.loads((tmp_path / "q" / "provenance.json").read_text())
    assert quantized["fit_report"]["quantization"] == "nf4"
    assert quantized["fingerprint"] == json.loads((adapters["gates"] / "provenance.json").read_text())["fingerprint"]


def test_fit_refuses_bad_data_before_writing_anything(work, tmp_path, capsys):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=" "completion": "4"}\n')
    for data, message in ((bad, "bad.jsonl:2: not valid JSON"),
                          (write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "x"}]), "keys.jsonl:1: unknown row format"),
                          (write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "x", "completion": ""}]),
                           "empty.jsonl:1: empty completion")):
        run("fit", "--model", work / "base", "--train", data, "--method", "gate", "--out", tmp_path / "out", expect=2)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    run("fit", "--model", work / "base", "--train", tmp_path / "ok.jsonl", "--method", "gate", "--gates", "9999",
        "--out", tmp_path / "out", "--quiet", expect=2)
    assert "num_gates=9999" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "empty.jsonl", "keys.jsonl", "ok.jsonl"]


def test_errors_through_the_console_script_are_one_line_without_traceback(adapters, work, tmp_path):
    save_tiny(tmp_path / "qwen", "tiny-qwen2")
    cases = [
        (["fit", "--model", work / "base", "--train", work / "train.jsonl", "--method", "lora", "--out", tmp_path / "o"],
         "invalid choice: 'lora'"),
        (["fit", "--model", tmp_path / "missing", "--train", work / "train.jsonl", "--method", "gate", "--out",
          tmp_path / "o"], "no model folder at"),
        (["eval", "--model", tmp_path / "qwen", "--adapter", adapters["gates"], "--data", work / "eval.jsonl"],
         "fitted to another architecture"),
        (["compose", "--adapters", adapters["gates"], adapters["mlora"], "--weights", "1", "1", "--out", tmp_path / "c"],
         "cannot compose LOGGATE with MLORA"),
        (["bake", "--rounds", adapters["mlora"], "--out", tmp_path / "b"], "expected ADAPTER:COEFFICIENT"),
    ]
    for args, message in cases:
        result = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_loading_on_other_weights_warns_and_strict_refuses(adapters, work, tmp_path, capsys):
    save_tiny(tmp_path / "other", "tiny-llama", seed=5)
    with pytest.warns(UserWarning, match="other weights of this architecture"):
        run("eval", "--model", tmp_path / "other", "--adapter", adapters["gates"], "--data", work / "eval.jsonl")
    run("eval", "--model", tmp_path / "other", "--adapter", adapters["gates"], "--data", work / "eval.jsonl",
        "--strict", expect=2)
    assert "strict mode refuses it" in capsys.readouterr().err


# -- data formats -----------------------------------------------------------------------------------------------------
def test_every_row_format_and_chat_templates(tmp_path):
    from peft_ext.data import load_examples, tokenize_example
    from peft_ext.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    rows = [
        {"prompt": "p", "completion": "c"},
        {"instruction": "do", "input": "this", "response": "done"},
        {"question": "q?", "answer": "a"},
        {"text": "all of it"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    examples = load_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, "auto")
    assert [(e.prompt, e.completion) for e in examples] == [
        ("p", "c"), ("do\nthis", "done"), ("q?", "a"), ("", "all of it"), ("user: hi\nassistant: ", "yo")]
    assert examples[2].source.endswith("rows.jsonl:3")
    text = tokenize_example(tokenizer, examples[3])  # a text row supervises every token after BOS
    assert text["labels"][0] == -100 and all(label != -100 for label in text["labels"][1:])
    # a chat template that renders the BOS itself: the prompt ends where the assistant turn starts, and no second BOS
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (chat,) = load_examples(write_jsonl(tmp_path / "chat.jsonl", rows[4:]), tokenizer, "auto")
    assert (chat.prompt, chat.completion) == ("<s><user>hi<assistant>", "yo")
    ids = tokenize_example(tokenizer, chat)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    (plain,) = load_examples(tmp_path / "chat.jsonl", tokenizer, "none")
    assert plain.prompt == "user: hi\nassistant: "
    for bad, message in (({"messages": [{"role": "user", "content": "hi"}]}, "must be the assistant's"),
                         ({"prompt": 3, "completion": "x"}, "'prompt' must be a string"),
                         ([1, 2], "expected a JSON object")):
        with pytest.raises(ValueError, match=message):
            load_examples(write_jsonl(tmp_path / "bad.jsonl", [rows[0], bad]), tokenizer)


def test_multiple_choice_eval_uses_length_normalised_nll(work, tmp_path):
    rows = [{"prompt": "1+1=", "choices": ["2", "11", "7"], "answer": 0},
            {"question": "2+2=", "choices": ["4", "22"], "answer": "22"}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    run("eval", "--model", work / "base", "--data", path, "--out", tmp_path / "mc.json")
    report = json.loads((tmp_path / "mc.json").read_text())
    assert report["kind"] == "multiple_choice" and report["base_metrics"]["examples"] == 2
    tokenizer, model = load_tokenizer(str(work / "base")), load_base_model(str(work / "base"))
    expected_correct, expected_nll = 0, 0.0
    for row, choice_rows in zip(rows, load_eval_rows(path, tokenizer)):
        scores = []
        for choice in row["choices"]:  # one prompt+choice at a time, no padding, no EOS
            batch = make_batches(tokenizer, [Example(choice_rows.prompt, choice)], 1)[0]
            batch["input_ids"], batch["labels"] = batch["input_ids"][:, :-1], batch["labels"][:, :-1]
            batch["attention_mask"] = batch["attention_mask"][:, :-1]
            scores.append(evaluate(model, [batch])["nll"])
        expected_correct += int(scores.index(min(scores)) == choice_rows.answer)
        expected_nll += scores[choice_rows.answer] / len(rows)
    assert report["base_metrics"]["accuracy"] == expected_correct / len(rows)
    assert report["base_metrics"]["answer_nll"] == pytest.approx(expected_nll, rel=1e-5)
    with pytest.raises(ValueError, match="mixes multiple-choice rows"):
        load_eval_rows(write_jsonl(tmp_path / "mixed.jsonl", [rows[0], {"prompt": "a", "completion": "b"}]))
    assert evaluate_choices(model, tokenizer, load_eval_rows(path, tokenizer), batch_size=5) == report["base_metrics"]


def test_generate_is_greedy_with_the_adapter(adapters, work, tmp_path):
    run("generate", "--model", work / "base", "--adapter", adapters["mlora"], "--prompt", "3+4=", "--prompt", "1+1=",
        "--max-new-tokens", "4", "--out", tmp_path / "g.json")
    outputs = json.loads((tmp_path / "g.json").read_text())["outputs"]
    model = PeftModel.from_pretrained(load_base_model(str(work / "base")), adapters["mlora"])
    tokenizer = load_tokenizer(str(work / "base"))
    for row in outputs:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits_path = ids
            for _ in range(4):  # greedy decoding by hand
                next_id = model(logits_path).logits[0, -1].argmax()
                if next_id == tokenizer.eos_token_id:
                    break
                logits_path = torch.cat([logits_path, next_id.view(1, 1)], dim=1)
        assert row["completion"] == tokenizer.decode(logits_path[0, ids.shape[1]:], skip_special_tokens=True)
    run("generate", "--model", work / "base", expect=2)


# -- compose, bake ----------------------------------------------------------------------------------------------------
def test_compose_gates_matches_the_python_api_and_refuses_blocking_plans(adapters, work, tmp_path, capsys):
    names = [adapters["gates"], adapters["gates_random"]]
    run("compose-plan", "--adapters", *names, "--weights", "1", "-1", "--out", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["kind"] == "gates" and {"clipped_fraction", "sign_conflicts", "pairs", "union_gates"} <= set(plan)
    run("compose", "--adapters", *names, "--weights", "1", "-1", "--out", tmp_path / "c")
    model = PeftModel.from_pretrained(fresh_base(work), names[0], adapter_name="a")
    model.load_adapter(names[1], adapter_name="b")
    python_plan = compose_gates(model, ["a", "b"], [1, -1], adapter_name="ab")
    assert python_plan["clipped_fraction"] == plan["clipped_fraction"] and python_plan["union_gates"] == plan["union_gates"]
    model.set_adapter("ab")
    cli = PeftModel.from_pretrained(fresh_base(work), tmp_path / "c")
    ids = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(cli(ids).logits, model(ids).logits)
    run("compose", "--adapters", *names, "--weights", "1", "1", "--budget", "0.01", "--out", tmp_path / "d", expect=2)
    assert "composition refused" in capsys.readouterr().err and not (tmp_path / "d").exists()
    run("compose", "--adapters", *names, "--weights", "1", "1", "--budget", "0.01", "--out", tmp_path / "d", "--force")


def fresh_base(work):
    return load_base_model(str(work / "base"))


def test_lowrank_plan_measures_principal_angles_and_interference(tmp_path):
    from conftest import OneLinear

    def saved(name, columns, rows):  # a modulated LoRA whose B spans `columns` and A spans `rows` of the identity
        model = get_peft_model(OneLinear(d_in=8, d_out=8), ModulatedLoraConfig(r=2, target_modules=["lin"]))
        layer = model.base_model.model.lin
        with torch.no_grad():
            layer.mlora_A["default"].copy_(torch.eye(8)[rows])
            layer.mlora_B["default"].copy_(torch.eye(8)[:, columns])
        model.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    first, same, apart = saved("a", [0, 1], [0, 1]), saved("b", [0, 1], [0, 1]), saved("c", [2, 3], [4, 5])
    from peft_ext.compose import plan_lowrank

    pair = plan_lowrank([(first, 1.0), (same, -1.0)])["pairs"][0]["modules"]["lin"]
    assert pair["columns"]["max_cosine"] == pytest.approx(1.0) and pair["delta_cosine"] == pytest.approx(-1.0)
    plan = plan_lowrank([(first, 1.0), (apart, 1.0)])
    pair = plan["pairs"][0]["modules"]["lin"]
    assert pair["columns"]["max_cosine"] == pytest.approx(0.0, abs=1e-12) and pair["delta_cosine"] == 0.0
    assert not plan["warnings"] and plan_lowrank([(first, 1.0), (same, 2.0)])["warnings"]


def test_compose_and_bake_of_lowrank_adapters_equal_the_python_bake(adapters, work, tmp_path):
    rounds = [(str(adapters["mlora"]), 1.33), (str(adapters["mpissa"]), -0.5)]
    run("bake", "--rounds", *(f"{path}:{c}" for path, c in rounds), "--out", tmp_path / "bake")
    run("compose", "--adapters", *(p for p, _ in rounds), "--weights", "1.33", "-0.5", "--out", tmp_path / "sum")
    expected = bake(fresh_base(work), rounds)
    ids = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        for folder in ("bake", "sum"):
            loaded = PeftModel.from_pretrained(fresh_base(work), tmp_path / folder)
            assert torch.equal(loaded(ids).logits, expected(ids).logits)
    assert json.loads((tmp_path / "bake" / "bake_report.json").read_text())["ranks"]
    assert json.loads((tmp_path / "bake" / "provenance.json").read_text())["fingerprint"]


# -- inspect, lint, card, doctor --------------------------------------------------------------------------------------
def test_inspect_reports_counts_histograms_ranks_and_overlap(adapters, tmp_path):
    run("inspect", adapters["gates"], adapters["gates_random"], adapters["mlora"], "--out", tmp_path / "i.json")
    report = json.loads((tmp_path / "i.json").read_text())
    gates, _, lora = report["adapters"]
    assert gates["peft_type"] == "LOGGATE" and gates["parameters"]["free_gates"] == 64
    assert sum(block["selected"] for block in gates["gates"]["per_block"]) == 64
    assert sum(gates["gates"]["histogram"]["counts"]) == 64
    assert lora["parameters"]["trainable"] == 16384 and all(t["rank"] == 4 for t in lora["targets"].values())
    weights = load_file(adapters["mlora"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    dense = weights[f"{key}.mlora_B"] @ weights[f"{key}.mlora_A"]  # alpha = r: scale 1
    assert lora["targets"]["model.layers.0.self_attn.q_proj"]["delta_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
    overlaps = {tuple(Path(a).name for a in pair["adapters"]): pair for pair in report["overlap"]}
    assert 0 < overlaps[("gates", "gates_random")]["jaccard"] < 1
    assert overlaps[("gates", "mlora")]["comparable"] is False


def test_lint_flags_problems_and_fails_on_errors(adapters, tmp_path, capsys):
    run("lint", adapters["gates"], adapters["mlora"], "--out", tmp_path / "clean.json")
    assert json.loads((tmp_path / "clean.json").read_text()) == {str(adapters["gates"]): [], str(adapters["mlora"]): []}
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.1))
    with torch.no_grad():
        model.base_model.model.model.layers[2].loggate_raw["default"][:5] = 10.0  # saturated, all in one block
    model.peft_config["default"].base_model_name_or_path = "owner/model"  # a Hub id without a pinned revision
    model.save_pretrained(tmp_path / "odd")
    run("lint", tmp_path / "odd", "--out", tmp_path / "odd.json")
    codes = {f["code"] for f in json.loads((tmp_path / "odd.json").read_text())[str(tmp_path / "odd")]}
    assert codes == {"saturated_gates", "single_layer", "revision_unpinned", "fingerprint_absent"}
    run("lint", tmp_path / "odd", "--strict", expect=1)
    tensors = load_file(tmp_path / "odd" / "adapter_model.safetensors")
    next(t for k, t in tensors.items() if "raw" in k)[0] = float("nan")
    save_file(tensors, tmp_path / "odd" / "adapter_model.safetensors")
    run("lint", tmp_path / "odd", expect=1)
    assert "error: nan_inf" in capsys.readouterr().out


def test_card_and_doctor(adapters, work, tmp_path, capsys):
    (adapters["mpissa"] / "README.md").unlink()
    run("card", adapters["mpissa"])
    card = (adapters["mpissa"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "import peft_ext" in card and "KeyError: 'MPISSA'" in card
    run("doctor", "--model", work / "base", "--out", tmp_path / "d.json")
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["decoder_blocks"] == {"path": "model.layers", "count": 4} and report["forward"]["finite"]
    assert report["tokenizer"]["eos_token"] == "</s>" and report["bitsandbytes"]["available"]
    run("doctor", "--model", work / "base", "--dtype", "bfloat16", "--max-log-gate", "0.01", "--out", tmp_path / "b.json")
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["dtype"] == "bfloat16" and "spans only 2.6 representable steps" in report["warnings"][0]
    run("doctor", "--model", work / "base", "--load-in-4bit", "--out", tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text())["quantized_layers"] == ["Linear4bit"]
