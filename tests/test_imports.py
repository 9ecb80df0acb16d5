"""What importing costs: `import sparse_plugin` loads nothing heavy yet makes `optim="spiel_sm3"` work, and
`sparse-merge` loads none of the Trainer stack and prints nothing on stderr but its own refusals.

Module sets are checked in fresh interpreters (`sys.modules` of this one holds whatever other tests imported).
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

from adapter_utils import saved_setup

from sparse_plugin.integrations import hf_registry
from sparse_plugin.integrations.import_hooks import when_imported

ROOT = Path(__file__).resolve().parent.parent
# Imported by the Trainer stack (transformers' training_args pulls in peft, and peft bitsandbytes) or by the GPU path.
TRAINER_STACK = ["transformers", "accelerate", "peft", "bitsandbytes", "trl", "triton", "torch._dynamo"]
REPORT = "import json, sys; print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"


def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root, so `sparse_plugin` is this checkout's."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )


def _loaded(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_import_sparse_plugin_loads_neither_torch_nor_the_trainer_stack():
    done = _python("import sparse_plugin\n" + REPORT.format(modules=["torch", *TRAINER_STACK]))
    assert _loaded(done) == []
    assert done.stderr == ""


# Each order reaches the registration another way: the README's, where hooks fire while `SparseCallback`'s module
# imports transformers' `trainer_callback`, which imports `training_args` half-way through its own import; or
# registration at once because transformers came first.
ORDERS = {
    "sparse_plugin first": "import sparse_plugin\nfrom sparse_plugin import SparseCallback\nfrom transformers import Trainer, TrainingArguments",
    "transformers first": "from transformers import Trainer, TrainingArguments\nimport sparse_plugin",
}
BUILD = """
import transformers.trainer
from conftest import tiny_llama
model = sparse_plugin.prepare_model(tiny_llama(), sparse_plugin.SparseConfig(density=0.05))
args = TrainingArguments("{out}", optim="spiel_sm3", use_cpu=True, report_to=[], max_steps=3)
trainer = Trainer(model=model, args=args)
print(type(trainer.create_optimizer()).__name__, transformers.trainer.validate_quantization_for_training.accepts_sparse_layers)
"""


def test_optim_names_work_right_after_import_sparse_plugin(tmp_path):
    for order, imports in ORDERS.items():
        done = _python(f"import sys; sys.path.insert(0, 'tests')\n{imports}\n" + BUILD.format(out=tmp_path / "out"))
        assert done.returncode == 0, f"{order}: {done.stderr[-3000:]}"
        assert done.stdout.splitlines()[-1] == "SM3 True", order


def test_sparse_merge_loads_no_trainer_stack_and_only_its_refusal_reaches_stderr(tmp_path):
    saved = saved_setup(tmp_path)
    missing = tmp_path / "missing"
    code = f"""
from sparse_plugin.cli import main
assert main(["inspect", {str(saved.adapter)!r}]) == 0
assert main(["merge", "--base", {str(saved.base)!r}, "--adapter", {str(saved.adapter)!r},
             "--output", {str(tmp_path / "merged")!r}, "--device", "cpu", "--quiet"]) == 0
assert main(["inspect", {str(missing)!r}]) == 2
""" + REPORT.format(modules=TRAINER_STACK)
    done = _python(code)
    assert _loaded(done) == []
    assert (tmp_path / "merged").is_dir()
    [line] = done.stderr.splitlines()
    assert line.startswith("sparse-merge: error: ") and str(missing) in line


def test_sparse_merge_help_writes_nothing_to_stderr_and_loads_no_torch():
    # The console script's own code (pyproject's `sparse-merge = "sparse_plugin.cli:main"`).
    done = _python(
        "import sys\nfrom sparse_plugin.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        + REPORT.format(modules=["torch", *TRAINER_STACK]),
        "--help",
    )
    assert done.stdout.startswith("usage: sparse-merge")
    assert _loaded(done) == []
    assert done.stderr == ""


def _module_file(tmp_path, monkeypatch, name: str) -> None:
    (tmp_path / f"{name}.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_when_imported_calls_back_once_after_the_module_ran(tmp_path, monkeypatch):
    _module_file(tmp_path, monkeypatch, "watched_by_sparse_plugin")
    seen = []
    when_imported("watched_by_sparse_plugin", lambda module: seen.append(module.VALUE))
    assert seen == []
    module = importlib.import_module("watched_by_sparse_plugin")
    assert seen == [42]
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
    importlib.reload(module)
    assert seen == [42]


def test_when_imported_calls_back_at_once_for_a_module_already_imported(tmp_path, monkeypatch):
    _module_file(tmp_path, monkeypatch, "imported_before_sparse_plugin")
    module = importlib.import_module("imported_before_sparse_plugin")
    seen = []
    when_imported("imported_before_sparse_plugin", seen.append)
    assert seen == [module]


def test_fsdp_plugin_reads_accelerate_without_creating_its_state(monkeypatch):
    from accelerate.state import AcceleratorState, PartialState

    # As in a fresh process: no Accelerator yet (other tests in this one have built some).
    monkeypatch.setattr(PartialState, "_shared_state", type(PartialState._shared_state)())
    monkeypatch.setattr(AcceleratorState, "_shared_state", type(AcceleratorState._shared_state)())
    assert hf_registry.fsdp_plugin() is None
    assert PartialState._shared_state == {} and AcceleratorState._shared_state == {}
