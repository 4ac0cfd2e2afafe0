"""Write a complete tiny UniDiffuser model set in exactly the official file formats
(the command line is tools/tiny_world.py).

Files: `uvit_v1.pth` (plain state_dict), `autoencoder_kl.pth` (LDM layout), `caption_decoder.pth`
(`module.` prefix, a tiny GPT-2 with the legacy attention buffers), and Hugging Face folders
`clip-vit-large-patch14/` and `clip-vit-base-patch32/` (full CLIPModel + the real CLIP BPE vocabulary).
Tests and the demo load these through the production loaders, so the real code paths run on CPU.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from typing import Callable
from pathlib import Path

import ml_collections
import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, GPT2Config, GPT2LMHeadModel

from libs.files import atomic_path
from libs.config import load_config
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.clip import CLIP_MEAN, CLIP_STD
from libs.models.loading import autoencoder_ldm_state, build_autoencoder
from libs.models.uvit import UViT
from libs.outputs import check_output_folder, only

MARKER = "tiny_world.json"
SEED = 0


def clip_bpe_source() -> Path:
    """OpenAI's BPE merges file, shipped by the `clip-anytorch` package (never imported: it needs torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP vocabulary comes from the clip-anytorch package: "
                           "pip install --no-deps -r requirements-nodeps.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall clip-anytorch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """Build vocab.json (49,408 entries) and merges.txt (48,894 merges) from the real BPE file."""
    lines = gzip.open(clip_bpe_source(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [token + "</w>" for token in alphabet] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _clip_config(text_hidden: int, text_layers: int, text_heads: int, vision_hidden: int, vision_layers: int,
                 vision_heads: int, image_size: int, patch_size: int, projection_dim: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=text_hidden, intermediate_size=4 * text_hidden, num_hidden_layers=text_layers,
                         num_attention_heads=text_heads, max_position_embeddings=77, vocab_size=49408,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
                         projection_dim=projection_dim),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
                           projection_dim=projection_dim),
        projection_dim=projection_dim,
    )


def write_clip_model(folder: Path, clip_config: CLIPConfig, tokenizer_folder: Path) -> None:
    """A full CLIPModel folder (like the hub's) with tokenizer and image-processor files."""
    model = CLIPModel(clip_config)
    model.save_pretrained(folder)
    if folder != tokenizer_folder:
        CLIPTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    size = clip_config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)


def caption_decoder_state(config) -> dict[str, torch.Tensor]:
    """The official layout: `module.`-prefixed prefix layers and GPT-2 (vocab 50258), including the legacy
    persistent `attn.bias`/`attn.masked_bias` buffers that old transformers wrote."""
    hidden = config.caption_decoder.prefix_dim
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50258, n_positions=128, n_embd=hidden, n_layer=2, n_head=2))
    state = {f"module.gpt.{k}": v for k, v in gpt.state_dict().items()}
    for layer in range(gpt.config.n_layer):
        n = gpt.config.n_positions
        state[f"module.gpt.transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"module.gpt.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    prefix = CaptionDecoderPrefix(**config.caption_decoder)
    state.update({f"module.{k}": v for k, v in prefix.state_dict().items()})
    return state


def _save_pickle(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)


def write_base_models(config, folder: Path, caption_decoder: Callable[[], dict[str, torch.Tensor]]) -> dict[str, Path]:
    """uvit_v1.pth, autoencoder_kl.pth and caption_decoder.pth with random weights of `config`'s sizes, in the
    official pickle formats (the tiny world and the benches' full-size models both write them here);
    returns them by config.paths key. `caption_decoder` makes that file's state, after the other two."""
    files = {"nnet": folder / "uvit_v1.pth", "autoencoder": folder / "autoencoder_kl.pth",
             "caption_decoder": folder / "caption_decoder.pth"}
    _save_pickle(UViT(**config.nnet).state_dict(), files["nnet"])
    _save_pickle(autoencoder_ldm_state(build_autoencoder(config)), files["autoencoder"])
    _save_pickle(caption_decoder(), files["caption_decoder"])
    return files


def build_tiny_world(config_name: str = "tiny", out: str | Path | None = None, force: bool = False) -> Path:
    """Write the tiny model set (deterministic, seed 0) and return its folder; skips when up to date."""
    config = load_config(config_name)
    folder = Path(out) if out else Path(config.paths.nnet).parent
    marker = folder / MARKER
    fingerprint = {"config": {k: v for k, v in config.to_dict().items() if k != "paths"}, "seed": SEED, "format": 2}
    fingerprint = json.loads(json.dumps(fingerprint, default=list))
    if not force and marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return folder
    written = [Path(config.paths[key]).name for key in ("nnet", "autoencoder", "caption_decoder", "clip_text", "clip_img")]
    check_output_folder(folder, "tiny world folder (--out)", only(*written, MARKER))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        _write_world(config, folder)
        marker.write_text(json.dumps(fingerprint, indent=1))
    except BaseException:  # a full disk, an interruption: no half-written world left behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder



def _write_world(config: ml_collections.ConfigDict, folder: Path) -> None:
    torch.manual_seed(SEED)
    write_base_models(config, folder, lambda: caption_decoder_state(config))

    tiny = config.tiny_clip
    text_folder = folder / Path(config.paths.clip_text).name
    write_clip_tokenizer(text_folder)
    write_clip_model(text_folder, _clip_config(**tiny.to_dict()), text_folder)
    write_clip_model(folder / Path(config.paths.clip_img).name, _clip_config(**tiny.to_dict()), text_folder)
