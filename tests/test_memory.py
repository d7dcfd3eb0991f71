"""Controller memory store: versions, audit and tampering, crashes, concurrency, retrieval, request-scoped serving."""

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import GateConfig, ModulatedLoraConfig
from peft_ext.cli import main
from peft_ext.loading import load_base_model, load_tokenizer
from peft_ext.memory import MemoryStore, MemoryStoreError
from peft_ext.provenance import fingerprint, write_provenance
from peft_ext.serving import MemoryServer
from peft_ext.tiny import save_tiny

TOPICS = {  # memory text: a query that should find it first
    "french cooking recipes with butter and cream": "how much butter in a french sauce",
    "python asyncio event loop debugging": "debug my asyncio event loop",
    "quarterly sales report for the finance team": "finance quarterly report",
    "hiking trails in the swiss alps": "alps hiking trails",
    "user prefers short formal answers": "formal answers preference",
    "procedure for resetting a router": "how to reset the router",
}


def make_adapter(folder, base_dir, config, seed):
    base = load_base_model(str(base_dir))
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    write_provenance(folder, fingerprint(load_base_model(str(base_dir))), str(base_dir))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    save_tiny(root / "base")
    save_tiny(root / "qwen", "tiny-qwen2")
    adapters = {
        "gate_a": make_adapter(root / "gate_a", root / "base", GateConfig(init="random", max_log_gate=0.3), 1),
        "gate_b": make_adapter(root / "gate_b", root / "base", GateConfig(init="random", max_log_gate=0.3), 2),
        "lora": make_adapter(root / "lora", root / "base", ModulatedLoraConfig(r=2, init_b="random"), 3),
        "qwen": make_adapter(root / "qwen_gate", root / "qwen", GateConfig(init="random"), 4),
    }
    return root, adapters


@pytest.fixture
def store(tmp_path):
    return MemoryStore(tmp_path / "store")


# -- versions, deletion, rollback -------------------------------------------------------------------------------------
def test_versions_soft_delete_rollback_and_purge(store, world):
    _, adapters = world
    item = store.add("notes", "french cooking recipes", adapters["gate_a"], tags=["food"], metadata={"by": "me"})
    assert item["version"] == 1 and item["deleted_at"] is None and item["created_at"].endswith("+00:00")
    item_id = item["id"]
    updated = store.update(item_id, text="french pastry recipes", adapter=adapters["gate_b"])
    assert updated["version"] == 2 and updated["versions"] == [1, 2] and updated["tags"] == ["food"]
    assert [hit["id"] for hit in store.search("pastry")] == [item_id] and store.search("cooking") == []
    rolled = store.rollback(item_id, 1)
    assert rolled["version"] == 1 and rolled["text"] == "french cooking recipes"
    assert rolled["adapter_sha256"] == item["adapter_sha256"]
    assert store.update(item_id, text="french bread")["version"] == 3  # never 2 again
    assert store.get(item_id, version=2)["text"] == "french pastry recipes"
    store.delete(item_id)
    assert store.list() == [] and store.search("bread") == [] and store.list(include_deleted=True)[0]["id"] == item_id
    with pytest.raises(MemoryStoreError, match="deleted; restore it"):
        store.update(item_id, text="x")
    with pytest.raises(MemoryStoreError, match="already deleted"):
        store.delete(item_id)
    store.restore(item_id)
    assert [hit["id"] for hit in store.search("bread")] == [item_id]
    assert [e["kind"] for e in store.events()] == ["add", "update", "rollback", "update", "delete", "restore"]
    assert store.audit()["ok"]
    other = store.add("notes", "keeps gate b", adapters["gate_b"])
    store.purge(item_id)
    with pytest.raises(MemoryStoreError, match="no memory"):
        store.get(item_id)
    assert not (store.adapters / item["adapter_sha256"]).exists()  # gate_a was only used by the purged memory
    assert (store.adapters / other["adapter_sha256"]).is_dir()  # gate_b is still used
    report = store.audit()
    assert report["ok"] and report["garbage"] == [] and report["items"] == 1


def test_rollback_is_validated_before_it_becomes_current(store, world):
    _, adapters = world
    item = store.add("notes", "first", adapters["gate_a"])
    store.update(item["id"], adapter=adapters["gate_b"])
    weights = store.adapters / item["adapter_sha256"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(MemoryStoreError, match="does not match its hash"):
        store.rollback(item["id"], 1)
    assert store.get(item["id"])["version"] == 2 and [e["kind"] for e in store.events()] == ["add", "update"]


def test_a_namespace_serves_one_base_model_and_bad_input_is_refused(store, world):
    _, adapters = world
    store.add("notes", "llama memory", adapters["gate_a"])
    with pytest.raises(MemoryStoreError, match="another base model"):
        store.add("notes", "qwen memory", adapters["qwen"])
    store.add("qwen-notes", "qwen memory", adapters["qwen"])
    with pytest.raises(MemoryStoreError, match="non-empty text"):
        store.add("notes", "  ", adapters["gate_a"])
    folder = adapters["gate_a"].parent / "no_provenance"
    get_peft_model(load_base_model(str(world[0] / "base")), GateConfig()).save_pretrained(folder)
    with pytest.raises(MemoryStoreError, match="records no base-model fingerprint"):
        store.add("notes", "x", folder)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        store.add("notes", "x", world[0] / "base")
    assert store.audit()["ok"] and len(store.list()) == 2


# -- audit and tampering ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tamper, code", [
    ("UPDATE events SET payload = replace(payload, 'cooking', 'baking') WHERE seq = 1", "chain_broken"),
    ("UPDATE events SET at = '2020-01-01T00:00:00+00:00' WHERE seq = 2", "chain_broken"),
    ("UPDATE items SET text = 'rewritten' WHERE version = 1", "state_mismatch"),
    ("UPDATE heads SET version = 1", "state_mismatch"),
    ("DELETE FROM search", "index_mismatch"),
])
def test_audit_detects_tampering(store, world, tamper, code):
    _, adapters = world
    item = store.add("notes", "french cooking", adapters["gate_a"])
    store.update(item["id"], text="french cooking, revised")
    assert store.audit()["ok"]
    with sqlite3.connect(store.path / "store.sqlite") as connection:
        connection.execute(tamper)
    report = store.audit()
    assert not report["ok"] and code in {p["code"] for p in report["problems"]}
    assert all(p["id"] == item["id"] for p in report["problems"])


def test_audit_detects_missing_and_changed_adapter_files(store, world, capsys):
    _, adapters = world
    first = store.add("notes", "one", adapters["gate_a"])
    second = store.add("notes", "two", adapters["gate_b"])
    config = store.adapters / first["adapter_sha256"] / "adapter_config.json"
    config.write_text(config.read_text().replace("0.3", "0.4"))
    for path in (store.adapters / second["adapter_sha256"]).iterdir():
        path.unlink()
    (store.adapters / second["adapter_sha256"]).rmdir()
    problems = {(p["code"], p["id"]) for p in store.audit()["problems"]}
    assert problems == {("hash_mismatch", first["id"]), ("missing_files", second["id"])}
    assert main(["memory", "audit", "--store", str(store.path)]) == 1
    assert '"ok": false' in capsys.readouterr().out


# -- crashes and concurrency ------------------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from peft_ext.memory import MemoryStore
    store_path, adapter, fresh, where = sys.argv[1:5]
    store = MemoryStore(store_path)
    store.add("notes", "before the crash", adapter)
    original = getattr(MemoryStore, where)
    def killed(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: as if the power went
        return result
    setattr(MemoryStore, where, killed if where == "_stage_adapter" else staticmethod(killed))
    store.add("notes", "killed mid-way", fresh)
""")


@pytest.mark.parametrize("where", ["_stage_adapter", "_append_event"])
def test_a_process_killed_during_add_leaves_a_store_that_audit_passes(tmp_path, world, where):
    """Killed after the adapter was copied in (before the transaction), or inside the transaction (before COMMIT)."""
    _, adapters = world
    fresh_adapter = tmp_path / "fresh"
    make_adapter(fresh_adapter, world[0] / "base", GateConfig(init="random"), 7)  # not yet in the store
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "store"), str(adapters["gate_a"]),
                             str(fresh_adapter), where], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    store = MemoryStore(tmp_path / "store")
    report = store.audit()
    assert report["ok"], report["problems"]
    assert len(report["garbage"]) == 1  # the fresh adapter's folder, copied in but never referenced
    assert [m["text"] for m in store.list()] == ["before the crash"] and report["events"] == 1
    store.add("notes", "after the crash", fresh_adapter)  # the store keeps working
    assert store.audit()["ok"]
    store.collect_garbage()
    assert store.audit()["garbage"] == []


ADD_SCRIPT = textwrap.dedent("""
    import sys
    from peft_ext.memory import MemoryStore
    store_path, worker, first, second = sys.argv[1:5]
    store = MemoryStore(store_path)
    for i in range(25):
        store.add("shared", f"worker {worker} memory {i}", first if i % 2 else second, tags=[f"w{worker}"])
""")


@pytest.mark.slow
def test_four_processes_adding_at_once_lose_nothing(tmp_path, world):
    _, adapters = world
    MemoryStore(tmp_path / "store")
    workers = [subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(tmp_path / "store"), str(w),
                                 str(adapters["gate_a"]), str(adapters["gate_b"])], stderr=subprocess.PIPE, text=True)
               for w in range(4)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read()[-2000:]
    store = MemoryStore(tmp_path / "store")
    report = store.audit()
    assert report["ok"] and report["items"] == 100 and report["events"] == 100, report["problems"]
    assert len({m["text"] for m in store.list("shared")}) == 100
    assert [e["seq"] for e in store.events()] == list(range(1, 101))


# -- retrieval --------------------------------------------------------------------------------------------------------
def test_retrieval_ranks_the_right_memory_first_and_finds_nothing_for_unrelated_queries(store, world):
    _, adapters = world
    ids = {text: store.add("topics", text, adapters["gate_a"], tags=[text.split()[0]])["id"] for text in TOPICS}
    for text, query in TOPICS.items():
        hits = store.search(query, "topics", k=3)
        assert hits and hits[0]["id"] == ids[text], (query, [h["text"] for h in hits])
        assert all(hit["score"] > 0 for hit in hits)
    assert store.search("quantum chromodynamics lattice", "topics") == []
    assert store.search("", "topics") == [] and store.search("!!! ???", "topics") == []
    assert store.search("french cooking", "other-namespace") == []


def test_a_custom_retriever_plugs_in_with_the_same_output(tmp_path, world):
    class TagRetriever:
        def search(self, store, query, namespace, k):
            return [(m["id"], 1.0) for m in store.list(namespace) if query in m["tags"]][:k]

    store = MemoryStore(tmp_path / "store", retriever=TagRetriever())
    item = store.add("n", "anything", world[1]["gate_a"], tags=["blue"])
    (hit,) = store.search("blue")
    assert hit["id"] == item["id"] and hit["score"] == 1.0 and set(item) <= set(hit)


# -- serving ----------------------------------------------------------------------------------------------------------
def test_serving_attaches_for_the_request_only_and_matches_peft(store, world):
    root, adapters = world
    store.add("n", "french cooking recipes", adapters["gate_a"])
    store.add("n", "swiss alps hiking", adapters["lora"])
    model = load_base_model(str(root / "base"))
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        server = MemoryServer(model, store, "n", k=1)
        assert torch.equal(model(ids).logits, base)  # hooks installed, nothing attached: the base model bit for bit
        expected = {}
        for name in ("gate_a", "lora"):
            expected[name] = PeftModel.from_pretrained(load_base_model(str(root / "base")), adapters[name])(ids).logits
        with server.attached(server.retrieve("french cooking")):
            assert torch.equal(model(ids).logits, expected["gate_a"])
        with server.attached(server.retrieve("alps hiking")):
            assert torch.allclose(model(ids).logits, expected["lora"], atol=1e-5, rtol=0)
        assert torch.equal(model(ids).logits, base)
        both = server.compose(store.search("french alps", "n"), [1.0, 1.0])
        assert both.gates and both.deltas and len(both.memories) == 2
    tokenizer = load_tokenizer(str(root / "base"))
    result = server.generate(tokenizer, "french cooking", prompt="1+1=", max_new_tokens=3)
    assert [m["text"] for m in result["memories"]] == ["french cooking recipes"] and result["fallback"] is None
    assert server.generate(tokenizer, "zebra", max_new_tokens=2)["fallback"].startswith("no memory matched")
    server.close()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("quantization", ["load_in_4bit", "load_in_8bit"])
def test_serving_on_a_bitsandbytes_base_matches_peft_on_the_same_base(store, world, quantization):
    """Hooks sit on bnb ``Linear4bit`` / ``Linear8bitLt`` (subclasses of ``nn.Linear``) and add to their output; the
    quantized base keeps the fp32 base's fingerprint, so memories fitted on it attach."""
    root, adapters = world
    store.add("n", "french cooking recipes", adapters["gate_a"])
    store.add("n", "swiss alps hiking", adapters["lora"])
    load = lambda: load_base_model(str(root / "base"), **{quantization: True}, device="cpu")  # noqa: E731
    model = load()
    quantized = {"load_in_4bit": "Linear4bit", "load_in_8bit": "Linear8bitLt"}[quantization]
    assert any(type(module).__name__ == quantized for module in model.modules())
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        server = MemoryServer(model, store, "n", k=1)
        assert torch.equal(model(ids).logits, base)
        for query, name in (("french cooking", "gate_a"), ("alps hiking", "lora")):
            expected = PeftModel.from_pretrained(load(), adapters[name])(ids).logits
            with server.attached(server.retrieve(query)):
                served = model(ids).logits
            assert not torch.equal(served, base)
            assert torch.allclose(served, expected, atol=1e-4, rtol=0), (name, (served - expected).abs().max())
        assert torch.equal(model(ids).logits, base)


def test_two_threads_serving_different_memories_never_see_each_others(store, world):
    root, adapters = world
    store.add("n", "first memory alpha", adapters["gate_a"])
    store.add("n", "second memory beta", adapters["gate_b"])
    model = load_base_model(str(root / "base"))
    server = MemoryServer(model, store, "n", k=1)
    ids = torch.randint(4, 100, (1, 16), generator=torch.Generator().manual_seed(1))
    memories = {query: server.retrieve(query) for query in ("alpha", "beta")}
    with torch.no_grad():
        expected = {}
        for query, memory in memories.items():
            with server.attached(memory):
                expected[query] = model(ids).logits
        base = model(ids).logits
    assert not torch.equal(expected["alpha"], expected["beta"])
    barrier, failures = threading.Barrier(3), []

    def serve(query):
        barrier.wait()
        for _ in range(30):
            with torch.no_grad(), server.attached(memories[query] if query else None):
                out = model(ids).logits
            if not torch.equal(out, expected[query] if query else base):
                failures.append(query)

    threads = [threading.Thread(target=serve, args=(query,)) for query in ("alpha", "beta", None)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_serving_refuses_a_memory_of_another_base(store, world):
    root, adapters = world
    store.add("q", "qwen only memory", adapters["qwen"])
    server = MemoryServer(load_base_model(str(root / "base")), store, "q")
    with pytest.raises(MemoryStoreError, match="fitted to another base model"):
        server.retrieve("qwen memory")


# -- command line -----------------------------------------------------------------------------------------------------
def run(*args, expect=0):
    assert main([str(a) for a in args]) == expect


def test_memory_command_line_end_to_end(tmp_path, world, capsys):
    root, adapters = world
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    store = tmp_path / "store"
    run("memory", "add", "--store", store, "--namespace", "math", "--text", "adding small numbers", "--tags", "sums",
        "--model", root / "base", "--train", tmp_path / "sums.jsonl", "--method", "modulated-lora", "--rank", "4",
        "--steps", "30", "--lr", "1e-2", "--quiet")
    capsys.readouterr()
    run("memory", "list", "--store", store, "--out", tmp_path / "list.json")
    (item,) = json.loads((tmp_path / "list.json").read_text())
    assert item["peft_type"] == "MLORA" and item["tags"] == ["sums"]
    assert not list((store / "adapters" / ".staging").iterdir())  # the fitted folder was moved in, nothing left
    run("memory", "search", "numbers", "--store", store, "--out", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())[0]["id"] == item["id"]
    run("memory", "eval", "--store", store, "--model", root / "base", "--data", tmp_path / "sums.jsonl",
        "--query", "adding numbers", "--out", tmp_path / "e.json")
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["memory"]["nll"] < evaluation["base"]["nll"] - 0.3
    assert all(row["memories"][0]["id"] == item["id"] for row in evaluation["rows"])
    run("memory", "generate", "--store", store, "--model", root / "base", "--query", "unrelated zebra",
        "--max-new-tokens", "2", "--out", tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text())["fallback"]
    run("memory", "update", item["id"], "--store", store, "--adapter", adapters["lora"], "--text", "new text")
    run("memory", "rollback", item["id"], "--store", store, "--version", "1")
    run("memory", "delete", item["id"], "--store", store)
    run("memory", "purge", item["id"], "--store", store, expect=2)
    assert "pass --yes" in capsys.readouterr().err
    run("memory", "restore", item["id"], "--store", store)
    run("memory", "export", "--store", store, "--namespace", "math", tmp_path / "export")
    run("memory", "import", "--store", tmp_path / "copy", tmp_path / "export")
    run("memory", "show", item["id"], "--store", tmp_path / "copy", "--out", tmp_path / "show.json")
    copied = json.loads((tmp_path / "show.json").read_text())
    assert copied["versions"] == [1, 2] and copied["version"] == 1
    run("memory", "import", "--store", tmp_path / "copy", tmp_path / "export", expect=2)
    assert "already exists" in capsys.readouterr().err
    for folder in (store, tmp_path / "copy"):
        run("memory", "audit", "--store", folder, "--out", tmp_path / "audit.json")
        assert json.loads((tmp_path / "audit.json").read_text())["ok"]
