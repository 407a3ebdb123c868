"""Memory-mapped loading: a process that loads a ~250 MB checkpoint and runs it (which reads every weight)
must not grow by more than 1.2x the checkpoint's size on disk: never two copies of the model, whether the
tensors are used as stored, converted to another dtype, or quantized to int8 while loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocketr1.model import ModelConfig, Transformer, save_model

pytestmark = [pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"),
              pytest.mark.slow]  # a 250 MB checkpoint and three processes

# Runs in a fresh process: the baseline is taken once torch has run a tiny model, then the peak is reset.
SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pocketr1.model import load_model

def kib(key):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key + ":"))

def warm_up():  # torch's first ops initialise its kernels (tens of MB that have nothing to do with loading)
    from pocketr1.model import ModelConfig, Transformer
    with torch.device("meta"):
        Transformer(ModelConfig())
    small = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    with torch.inference_mode():
        small(torch.arange(1, 9)[None], torch.arange(8)[None], None)

warm_up()
base = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]), int8=sys.argv[3] == "int8")
ids = torch.arange(1, 9)[None]
with torch.inference_mode():
    model(ids, torch.arange(8)[None], None)  # reads every weight (and only a few embedding rows)
print(json.dumps({"base_mb": base / 1024, "peak_mb": kib("VmHWM") / 1024}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = Transformer(cfg)
    model.init_weights(0)
    folder = tmp_path_factory.mktemp("rss") / "model"
    save_model(model, folder)
    return folder


# Limits: as stored, the 1.2x; converted to bf16, half the size plus a tensor in flight (without
# releasing each source tensor's pages it would be 1.5x); int8, a quarter plus the float temporaries.
@pytest.mark.parametrize("dtype,mode,limit", [("float32", "plain", 1.2), ("bfloat16", "plain", 0.8),
                                              ("float32", "int8", 0.6)])
def test_loading_holds_one_copy(checkpoint: Path, dtype: str, mode: str, limit: float):
    disk_mb = (checkpoint / "model.safetensors").stat().st_size / 2**20
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint), dtype, mode], capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    grown = figures["peak_mb"] - figures["base_mb"]
    # 40 MB: the forward's activations, the allocator's slack.
    print(f"{mode} {dtype}: grew {grown:.0f} MB for {disk_mb:.0f} MB on disk")
    assert grown <= limit * disk_mb + 40, f"{mode} {dtype}: grew {grown:.0f} MB for {disk_mb:.0f} MB on disk"
    assert grown >= 0.2 * disk_mb  # the weights were really read: the measurement measures something
