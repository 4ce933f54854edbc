"""An augmentation-aware teacher cache: the teacher runs once per training image, on the whole clean image.

``segkd distill --teacher-cache DIR`` (or :func:`build_cache`) stores, per training image, the teacher's logits at
its own output stride and the feature taps the method reads, as fp16 tensors in safetensors shards of
``SHARD_SIZE`` images. At train time they are resampled with exactly the geometry of the student's crop
(:class:`~segkd.data.transforms.Geometry`: resize, random rescale, crop, flip, padding), so every step gets
full-context teacher targets without a teacher forward. Where: the DataLoader workers only read each image's stored
tensors (compact: fp16, or the top-K form) and hand them over with the crop's geometry (:func:`stored_item`,
batched by :class:`~segkd.engine.batch.StoredTargets`); the task warps the whole batch on the training device in
the step, before the loss (:func:`warp_stored`: densify a top-K cache, then one ``grid_sample`` per tensor kind).
The warp equals the per-crop warp the workers ran before, bit for bit when the batch's stored maps have one size
(every image of the same size), within a few float32 ulps when images of different sizes share a batch (edge
padding, see :class:`~segkd.engine.batch.StoredTargets`).

Layout of ``DIR``::

    cache.json               manifest: teacher (model, sha256 of the weights file), normalisation, teacher input
                             size, taps with their strides and channels, the image set (sha256 of every image
                             file, its shard), the shards and the sha256 of each shard file
    shard-00000.safetensors  ``<image sha256>.logits`` / ``<image sha256>.<tap>`` tensors, C x h x w, fp16 (fp32
                             with ``--cache-dtype float32``); its header metadata holds the cache key's digest
                             (teacher, weights, classes, ...)

What the key covers, and why: a cache answers "what does *this* teacher say about *this* image", so it is keyed by
the teacher checkpoint's sha256, the normalisation, the teacher's input size (``native``: the stored image size)
and the sha256 of every image file. It deliberately does **not** depend on crop size, rescale range or flips:
those are applied at train time by :func:`warp_stored`, so one cache serves any augmentation setting. A cache built for
another teacher, other weights, another normalisation or input size is refused with one line naming the mismatch;
an interrupted build continues where it stopped (shards are written atomically, the manifest after each shard).
Under torchrun every rank builds a disjoint slice of the shards and waits by polling, never at a long barrier
(:mod:`segkd.methods.cache_ranks`).

One cache, many runs: the image set is not part of the key. A cache built for a superset of a run's images serves
it as it is (e.g. built with ``--unlabeled`` images, used by a run without them), and a run with images the cache
lacks adds only those (new shards; the existing ones are never rewritten).

Verified shards: each shard carries the key's digest in its header and the manifest records each shard file's
sha256. A process checks both the first time it opens a shard (one read of the file, which the memory map reads
anyway), so a shard copied in from another teacher's cache, or changed on disk, is refused with one line naming
it instead of serving another teacher's answers. Tensors of the wrong rank or channel count are refused the same
way, and so is a manifest whose fields have the wrong types or whose shard names leave the directory.

Compact targets (``--cache-topk K``): instead of every class's logit, a shard stores per cell the K largest
logits (fp16, ``logits_top``), their class indices (uint8, int16 above 256 classes, ``logits_top_index``) and the
logsumexp of the other classes' logits (fp16, ``logits_rest``: the rest's probability mass, -inf when K = C).
The warp densifies them (:func:`densify`; :meth:`TeacherCache.tensors` does the same on read) to ``C`` logits in
which the top-K classes keep their logits and every other class gets ``rest - log(C - K)``: the rest's mass spread
evenly. Warping and every method then run as on a full cache. Why this form (see :func:`densify` for the proof
of what is exact):

* logits, not fp16 probabilities or log-probabilities: p in fp16 underflows below 6e-8 and loses relative
  precision below 6e-5, just where a temperature of 4 lifts the tail (p^(1/4)); and CWD's softmax runs over the
  *positions* of each class map, which a per-pixel offset (log p = z - logsumexp z) changes. Stored logits keep
  the teacher's own values, so K = C is the full cache bit for bit, for KD, DKD and CWD alike.
* the rest is stored, not recomputed as 1 - sum(top-K): that difference of fp16 numbers is tiny and imprecise on
  confident pixels, where the tempered tail matters most.

The top-K setting is part of the key: a top-2 cache never serves a full-logit run, nor the reverse.

Storage precision (``--cache-dtype``, part of the key): fp16 by default, half the bytes, each value rounded to
2^-11 of its magnitude (0.0078 at a logit of 15: far below what a distillation loss can tell). ``float32`` stores the
teacher's values exactly, for when two caches are to be compared: two teachers that agree to 1e-5 in fp32 (an ONNX
export and its checkpoint) differ by a whole fp16 step wherever their values straddle a rounding boundary, so only
fp32 caches show their agreement (benchmarks/onnx_cache_agreement.py).

Where the cache is approximate (also in docs/methods.md):

* **Rescale and crop of a CNN.** The warped map is the teacher's output on the whole image at its stored size,
  resampled; a teacher run on the rescaled crop would see less context and another object scale. That is the
  point (full-context targets), but it is not the same tensor.
* **Feature taps** are resampled bilinearly on their own grid (stride 8 for DeepLabV3's ``layer4``): sub-cell
  offsets of the crop are interpolated, not recomputed.
* **Padding borders.** Where the crop is padded (the rescaled image is smaller than the crop), there is no
  teacher output: cached logits and features are 0 there (uniform probabilities), and the ``inside`` extra marks
  the real pixels. A teacher run on the padded crop would predict *something* for the black border; methods that
  average over every pixel (kd without ``mask_ignore``, cwd) see uniform targets there instead.
* **Transformer teachers** (SegFormer): attention is global, so a crop changes every token, not just the border;
  cached logits are served (they are the teacher's best full-image answer) but ``transkd`` is refused (its spec's
  ``cache_refusal``), because its patch-embedding and stage-token terms compare token maps whose meaning is tied to
  the crop's patch grid.
* **Top-K caches** (K < C): exact at temperature 1 on the top-K probabilities and the rest's total mass; the rest
  is spread evenly, so what each method reads of it is approximate (:data:`TOPK_NOTES`, printed once per run).
* Online methods (``collab``, ``dml``) have no teacher to cache and are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from segkd.checkpoint import atomic_write_bytes, atomic_write_text, file_sha256
from segkd.data.datasets import short_reason
from segkd.data.transforms import Geometry, to_tensors
from segkd.engine.batch import StoredTargets, TeacherTargets
from segkd.errors import SegkdError
from segkd.methods import cache_ranks
from segkd.methods.targets import teacher_targets
from segkd.runlock import acquire_run_lock
from segkd.safeio import remove_orphan_tmps

MANIFEST = "cache.json"
FORMAT = "segkd-teacher-cache"
VERSION = 2  # 2: per-shard sha256 and key digest, tap channels (v1 caches are refused: build anew)
SHARD_SIZE = 32
CACHE_DTYPES = ("float16", "float32")  # --cache-dtype: how logits and taps are stored
# what a top-K cache (K < classes) changes for each method's loss: printed in one line when such a cache serves it
TOPK_NOTES = {
    "kd": "exact at temperature 1 on the top-K classes and the rest's mass; at T > 1 the tail's tempered mass is "
          "that of an even spread (at least the teacher's)",
    "dkd": "TCKD needs p of the labelled class and NCKD the whole non-target distribution (T 4): classes outside a "
           "pixel's top K read the rest's even share",
    "cwd": "its logit term is a softmax over the positions of every class map: where a class is outside a pixel's "
           "top K it reads the rest's even share there (the feature term is exact)",
    "c2vkd": "PDD needs p of the labelled class: exact when it is in the pixel's top K, else the rest's even share "
             "(the VLFD feature terms are exact)",
}


@dataclass
class CacheKey:
    """What a cache must agree with before it is used (see the module docstring)."""

    teacher: str
    weights_sha256: str
    num_classes: int
    mean: list[float]
    std: list[float]
    taps: dict[str, int]  # tap name -> stride
    logit_stride: int
    input: str = "native"
    topk: int = 0  # --cache-topk: classes stored per cell (0: all, full logits)
    dtype: str = "float16"  # --cache-dtype: how logits and taps are stored

    def mismatch(self, other: dict[str, Any]) -> str | None:
        """A one-phrase reason why the manifest ``other`` does not serve this key, or None."""
        if other.get("format") != FORMAT or other.get("version") != VERSION:
            return f"not a {FORMAT} v{VERSION} manifest"
        t = other.get("teacher", {})
        if t.get("model") != self.teacher:
            return f"built for teacher {t.get('model')}, not {self.teacher}"
        if t.get("weights_sha256") != self.weights_sha256:
            return (f"built for other teacher weights (sha256 {str(t.get('weights_sha256'))[:12]}…, this run's "
                    f"{self.weights_sha256[:12]}…)")
        if t.get("num_classes") != self.num_classes:
            return f"built for {t.get('num_classes')} classes, not {self.num_classes}"
        if not _close(other.get("mean"), self.mean) or not _close(other.get("std"), self.std):
            return f"built with mean/std {other.get('mean')}/{other.get('std')}, not {self.mean}/{self.std}"
        if other.get("input") != self.input:
            return f"built with teacher input {other.get('input')}, not {self.input}"
        if other.get("topk", 0) != self.topk:
            return (f"built with {_topk_words(other.get('topk', 0))}, this run asks for {_topk_words(self.topk)}; use "
                    "another --teacher-cache folder (or the cache's --cache-topk)")
        if other.get("dtype", "float16") != self.dtype:
            return (f"stored as {other.get('dtype')}, this run asks for --cache-dtype {self.dtype}; use another "
                    "--teacher-cache folder (or the cache's --cache-dtype)")
        have = other.get("taps", {})
        missing = [t for t in self.taps if t not in have]
        if missing:
            return f"holds no {missing[0]!r} tap (has: {', '.join(have) or 'logits only'}); build another cache"
        return None


def topk_note(method: str, topk: int, num_classes: int) -> str | None:
    """The one line a run prints when a top-K cache (K < classes) serves ``method``: what of its loss is exact."""
    if not topk or topk >= num_classes:
        return None
    why = TOPK_NOTES.get(method, "classes outside a pixel's top K read the rest's even share")
    return f"teacher cache: top-{topk} of {num_classes} classes per pixel; {method}: {why}"


def _topk_words(k: Any) -> str:
    return f"--cache-topk {k} (top-{k} logits)" if k else "full logits (--cache-topk 0)"


def _close(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    return a is not None and len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


@dataclass
class CacheImage:
    """One image to cache: its content hash (the key), a name for messages, and how to read it."""

    sha256: str
    name: str
    load: Any  # () -> uint8 H x W x 3


SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
KEY_META = "segkd_cache_key"


def key_digest(manifest: dict[str, Any]) -> str:
    """sha256 of what a shard's tensors depend on (teacher, weights, classes, normalisation, input, logit stride):
    written into each shard's header, compared when the shard is opened."""
    t = manifest["teacher"]
    parts = [t["model"], t["weights_sha256"], t["num_classes"], manifest["mean"], manifest["std"],
             manifest["input"], manifest["logit_stride"]]
    if manifest.get("topk", 0):  # appended only when set: full-logit v2 caches keep their digest
        parts.append(["topk", manifest["topk"]])
    if manifest.get("dtype", "float16") != "float16":  # likewise: fp16 caches keep theirs
        parts.append(["dtype", manifest["dtype"]])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class TeacherCache:
    """A complete cache opened for reading; tensors are read lazily per process (safetensors memory maps), and
    each shard is verified the first time this process opens it (see the module docstring)."""

    root: Path
    manifest: dict[str, Any]
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def taps(self) -> dict[str, int]:
        return {k: int(v["stride"]) for k, v in self.manifest["taps"].items()}

    @property
    def logit_stride(self) -> int:
        return int(self.manifest["logit_stride"])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own memory maps
        return {"root": self.root, "manifest": self.manifest, "_handles": {}}

    @property
    def topk(self) -> int:
        """Classes stored per cell (0: all of them, full logits)."""
        return int(self.manifest.get("topk", 0))

    @property
    def num_classes(self) -> int:
        return int(self.manifest["teacher"]["num_classes"])

    def tensors(self, sha: str, taps: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{"logits": C x h x w, <tap>: C' x h' x w'}`` of one image, float32 (``taps``: only those); a top-K
        cache's logits densified (:func:`densify`)."""
        raw = self.stored(sha, taps)
        if self.topk:
            top, index, rest = (raw.pop(n) for n in TOPK_TENSORS)
            raw = {"logits": densify(top, index, rest, self.num_classes), **raw}
        return {n: t.float() for n, t in raw.items()}

    def stored(self, sha: str, taps: Sequence[str] | None = None) -> dict[str, Tensor]:
        """One image's tensors as the shard stores them (fp16 ``logits`` or the top-K triple, fp16 taps; ``taps``:
        only those), shapes checked: what a DataLoader worker hands over (:func:`stored_item`)."""
        entry = self.manifest["images"].get(sha)
        if entry is None or entry.get("shard") is None:
            raise SegkdError(f"{self.root}: no cached teacher output for image {sha[:12]}…")
        shard = entry["shard"]
        names = [*(TOPK_TENSORS if self.topk else ("logits",)), *(self.taps if taps is None else taps)]
        try:
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = self._open(shard)
            raw = {n: handle.get_tensor(f"{sha}.{n}") for n in names}
        except SegkdError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise SegkdError(f"{self.root / shard}: unreadable teacher-cache shard ({short_reason(e)}); delete it "
                             "and run again to recompute its images") from None
        self._check_shapes(shard, raw)
        return raw

    def _open(self, shard: str) -> Any:
        """Open a shard after checking its sha256 against the manifest and its key digest against the cache's."""
        path = self.root / shard
        want = self.manifest.get("shard_sha256", {}).get(shard)
        if want is not None and path.is_file() and file_sha256(path) != want:
            raise SegkdError(f"{path}: does not match the sha256 the manifest recorded for it (copied from another "
                             "cache or changed on disk); delete it and run again to recompute its images")
        handle = safe_open(str(path), framework="pt")
        if (handle.metadata() or {}).get(KEY_META) != key_digest(self.manifest):
            raise SegkdError(f"{path}: a shard of another teacher cache (its key digest is not this cache's); delete "
                             "it and run again to recompute its images")
        return handle

    def _check_shapes(self, shard: str, out: dict[str, Tensor]) -> None:
        c, k = self.num_classes, self.topk
        want = {"logits": c, "logits_top": k, "logits_top_index": k, "logits_rest": 1}
        for name, t in out.items():
            n = want[name] if name in want else self.manifest["taps"][name].get("channels")
            if t.dim() != 3 or (n is not None and t.shape[0] != n):
                raise SegkdError(f"{self.root / shard}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                 f"{n if n is not None else 'C'} x h x w; delete the shard and run again")
        index = out.get("logits_top_index")
        if index is not None and (index.is_floating_point() or int(index.max()) >= c or int(index.min()) < 0):
            raise SegkdError(f"{self.root / shard}: tensor 'logits_top_index' holds no class indices of 0..{c - 1}; "
                             "delete the shard and run again")


TOPK_TENSORS = ("logits_top", "logits_top_index", "logits_rest")


def encode_logits(z: Tensor, topk: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """What a shard stores of one image's ``C x h x w`` logits: ``logits`` in ``dtype`` (fp16 by default), or with
    ``topk`` the K largest logits (``dtype``), their class indices (uint8 up to 256 classes, else int16) and the
    other classes' logsumexp (``dtype``, ``1 x h x w``; -inf when K = C). The rest is computed in fp32 from the
    unrounded logits."""
    if not topk:
        return {"logits": z.to(dtype).contiguous()}
    c = z.shape[0]
    top, index = z.float().topk(topk, dim=0)
    rest = z.float().scatter(0, index, float("-inf")).logsumexp(0, keepdim=True)
    return {"logits_top": top.to(dtype).contiguous(),
            "logits_top_index": index.to(torch.uint8 if c <= 256 else torch.int16).contiguous(),
            "logits_rest": rest.to(dtype).contiguous()}


def densify(top: Tensor, index: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """``C`` logits from a top-K cell (``... x K x h x w`` logits and indices, ``... x 1 x h x w`` rest): the top-K
    classes keep their logits, each other class gets ``rest - log(C - K)``. Works on batches (class axis -3).

    What is exact: softmax over classes is unchanged by a per-pixel offset, so the densified cell is the teacher's
    distribution with the rest's mass ``r = exp(rest) / Z`` spread evenly: at temperature 1 the top-K
    probabilities and ``r`` are the teacher's (``Z = sum_top exp(z_k) + exp(rest)`` is the teacher's partition
    function). At T != 1 the ratios among the top-K classes stay exact (``exp((z_i - z_j) / T)``), but the
    tail's tempered mass becomes ``(C-K)^(1-1/T) exp(rest/T)`` instead of ``sum_tail exp(z_j/T)``: by the power
    mean inequality at least the teacher's for T > 1 (equal when the tail is even), so tempered targets of a
    top-K cache put a little more mass on the tail. Warping the densified logits is warping the teacher's
    logits on the top-K classes (bilinear weights act per class), so a full cache and a K = C cache warp to the
    same maps; with K < C a cell's tail value is interpolated like any logit."""
    top = top.float()
    k = top.shape[-3]
    shape = (*top.shape[:-3], num_classes, *top.shape[-2:])
    if k < num_classes:
        out = (rest.float() - math.log(num_classes - k)).expand(shape).clone()
    else:
        out = top.new_empty(shape)
    return out.scatter_(-3, index.long(), top)


def image_sha256(path: str | Path) -> str:
    return file_sha256(Path(path))


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        raise SegkdError(f"{path}: not a valid teacher-cache manifest (JSON unreadable)") from None
    why = _malformed(doc)
    if why:
        raise SegkdError(f"{path}: not a valid teacher-cache manifest ({why}); delete the directory to rebuild it")
    return doc


def _malformed(doc: Any) -> str | None:
    """Why a parsed manifest cannot be used (wrong types, shard names outside the directory), or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return None  # CacheKey.mismatch names the format/version
    checks = [("images", dict), ("shards", list), ("taps", dict), ("teacher", dict), ("shard_sha256", dict),
              ("mean", list), ("std", list), ("logit_stride", int)]
    for name, kind in checks:
        if not isinstance(doc.get(name), kind):
            return f"{name!r} must be a {kind.__name__}, got {type(doc.get(name)).__name__}"
    for sha, e in doc["images"].items():
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not (
                e.get("shard") is None or isinstance(e.get("shard"), str)):
            return f"image entry {str(sha)[:12]}… must be {{name: str, shard: str or null}}"
    names = [*doc["shards"], *(e["shard"] for e in doc["images"].values() if e["shard"]), *doc["shard_sha256"]]
    bad = next((n for n in names if not isinstance(n, str) or not SHARD_NAME.fullmatch(n)), None)
    if bad is not None:
        return f"shard name {bad!r} is not shard-NNNNN.safetensors"
    if any(not isinstance(v, dict) or not isinstance(v.get("stride"), int) for v in doc["taps"].values()):
        return "every tap must be {stride: int}"
    if not isinstance(doc.get("topk", 0), int) or doc.get("topk", 0) < 0:
        return f"'topk' must be an int >= 0, got {doc.get('topk')!r}"
    if doc.get("dtype", "float16") not in CACHE_DTYPES:
        return f"'dtype' must be one of {', '.join(CACHE_DTYPES)}, got {doc.get('dtype')!r}"
    return None


def _add_images(manifest: dict[str, Any], images: Sequence[CacheImage]) -> int:
    """Enter the run's images the cache lacks (to be computed); returns how many."""
    new = [im for im in images if im.sha256 not in manifest["images"]]
    for im in new:
        manifest["images"][im.sha256] = {"name": im.name, "shard": None}
    return len(new)


def build_cache(root: str | Path, key: CacheKey, images: Sequence[CacheImage], teacher: torch.nn.Module,
                mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu",
                progress: bool = True, dist: Any = None) -> TeacherCache:
    """Create, continue, extend or just open the cache in ``root`` for ``images`` (deduplicated by content).

    A matching cache holding every image of the run (it may hold more) is opened without writing anything. Else
    the build takes the directory's lock (the run lock of :mod:`segkd.runlock`: a second process that needs the
    same cache waits for the first, then finds it complete), removes temp files of a build killed earlier, and
    computes only the images without a shard: new ones, and those of a shard deleted by hand. Under torchrun
    (``dist``: the run's :class:`~segkd.engine.distributed.DistInfo`) every rank builds a slice of the shards
    (:mod:`segkd.methods.cache_ranks`)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SegkdError(f"--teacher-cache {root}: exists and is not a directory")
    uniq = list({im.sha256: im for im in images}.values())
    if dist is not None and dist.enabled and dist.world_size > 1:

        return cache_ranks.build_ranked(root, key, uniq, teacher, mean, std, device, progress, dist)
    manifest = read_manifest(root)
    if manifest is not None and _complete(root, manifest, key, uniq):
        return TeacherCache(root, manifest)
    lock = _lock(root, progress)
    try:
        manifest = open_for_build(root, key, uniq, progress)
        todo = [im for im in uniq if manifest["images"][im.sha256].get("shard") is None]

        def record(name: str, chunk: dict[str, str], sha: str, channels: dict[str, int]) -> None:
            record_shard(manifest, name, chunk, sha, channels)
            atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")

        fill(root, manifest, plan_shards(todo, next_shard_index(root, manifest)), teacher, mean, std,
             torch.device(device), progress, record)
    finally:
        lock.release()
    return TeacherCache(root, manifest)


def open_for_build(root: Path, key: CacheKey, images: Sequence[CacheImage], progress: bool) -> dict[str, Any]:
    """Under the directory's lock (no other process writes there): remove temp files of killed writes, read or
    start the manifest, take in the shards of a killed multi-rank build (``part-r*.json``), forget shards deleted
    by hand, enter the run's new images; the manifest is written before it is returned."""

    remove_orphan_tmps(root)
    manifest = read_manifest(root)
    if manifest is None:
        manifest = _new_manifest(key)
    else:
        _complete(root, manifest, key, images)  # the one-line refusal of another teacher's cache
    cache_ranks.merge_parts(root, manifest)
    _forget_missing_shards(root, manifest)
    added = _add_images(manifest, images)
    if added and manifest["shards"] and progress:
        print(f"teacher cache {root}: adding {added} image(s) this run has and the cache lacks", file=sys.stderr,
              flush=True)
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    cache_ranks.remove_parts(root)
    return manifest


def _new_manifest(key: CacheKey) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION,
            "teacher": {"model": key.teacher, "weights_sha256": key.weights_sha256, "num_classes": key.num_classes},
            "mean": list(key.mean), "std": list(key.std), "input": key.input,
            "taps": {t: {"stride": s} for t, s in key.taps.items()}, "logit_stride": key.logit_stride,
            "topk": key.topk, "dtype": key.dtype, "images": {}, "shards": [], "shard_sha256": {}}


def _forget_missing_shards(root: Path, manifest: dict[str, Any]) -> None:
    """A shard deleted by hand: its images are computed again."""
    missing = [n for n in manifest["shards"] if not (root / n).is_file()]
    for entry in manifest["images"].values():
        if entry.get("shard") in missing:
            entry["shard"] = None
    manifest["shards"] = [n for n in manifest["shards"] if n not in missing]
    for n in missing:
        manifest["shard_sha256"].pop(n, None)


def _complete(root: Path, manifest: dict[str, Any], key: CacheKey, images: Sequence[CacheImage]) -> bool:
    """Whether ``manifest`` serves ``key`` and ``images`` as it is; raises the one-line refusal on a mismatch."""
    why = key.mismatch(manifest)
    if why:
        raise SegkdError(f"--teacher-cache {root}: {why}")
    entries = [manifest["images"].get(im.sha256) for im in images]
    return all(e is not None and e.get("shard") and (root / e["shard"]).is_file() for e in entries)


def _lock(root: Path, progress: bool) -> Any:
    waited = False
    while True:
        try:
            return acquire_run_lock(root, "--teacher-cache")
        except SegkdError as e:
            if "in use" not in str(e):
                raise
            if not waited and progress:
                print(f"teacher cache {root} is being built by another process; waiting", file=sys.stderr,
                      flush=True)
            waited = True
            time.sleep(2.0)


def next_shard_index(root: Path, manifest: dict[str, Any]) -> int:
    """1 + the largest shard index in the manifest or on disk: a new shard never overwrites a file (not even one
    a killed build wrote but did not record)."""
    names = [*manifest["shards"], *(p.name for p in root.glob("shard-*.safetensors"))]
    return 1 + max((int(n[6:-12]) for n in names if SHARD_NAME.fullmatch(n)), default=-1)


def plan_shards(todo: Sequence[CacheImage], base: int) -> list[tuple[str, list[CacheImage]]]:
    """``todo`` cut into shards of ``SHARD_SIZE`` images, numbered from ``base``."""
    return [(f"shard-{base + j:05d}.safetensors", list(todo[i:i + SHARD_SIZE]))
            for j, i in enumerate(range(0, len(todo), SHARD_SIZE))]


def record_shard(manifest: dict[str, Any], name: str, images: dict[str, str], sha: str,
                 channels: dict[str, int]) -> None:
    """Enter a written shard: its images (sha256 -> file name), its sha256 and the taps' channel counts."""
    for im_sha, im_name in images.items():
        manifest["images"].setdefault(im_sha, {"name": im_name, "shard": None})["shard"] = name
    for tap, c in channels.items():
        manifest["taps"][tap]["channels"] = int(c)
    if name not in manifest["shards"]:
        manifest["shards"].append(name)
    manifest["shard_sha256"][name] = sha


def fill(root: Path, manifest: dict[str, Any], jobs: list[tuple[str, list[CacheImage]]], teacher: torch.nn.Module,
         mean: Sequence[float], std: Sequence[float], device: torch.device, progress: bool, record: Any,
         label: str = "teacher cache") -> None:
    """Compute each job's images and write them as the shard it names, each with every tap the cache holds (not
    only the ones this run's method reads: a later run of another method finds them); ``record(name, {sha256:
    file name}, shard sha256, {tap: channels})`` after each shard."""
    teacher = teacher.to(device).eval()
    total = sum(len(chunk) for _, chunk in jobs)
    console = Console(stderr=True)
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress or not console.is_terminal)
    done = 0
    with bar:
        task = bar.add_task("cache", total=total)
        for name, chunk in jobs:
            tensors: dict[str, Tensor] = {}
            for im in chunk:
                tensors.update(_teacher_tensors(im, manifest, teacher, mean, std, device))
                bar.advance(task)
            sha = _write_shard(root / name, tensors, key_digest(manifest))
            record(name, {im.sha256: im.name for im in chunk}, sha,
                   {tap: int(tensors[f"{chunk[0].sha256}.{tap}"].shape[0]) for tap in manifest["taps"]})
            done += len(chunk)
            if progress and not console.is_terminal:
                print(f"{label}: {done}/{total} images", file=sys.stderr, flush=True)


def _teacher_tensors(im: CacheImage, manifest: dict[str, Any], teacher: torch.nn.Module, mean: Sequence[float],
                     std: Sequence[float], device: torch.device) -> dict[str, Tensor]:
    """What a shard holds of one image: its encoded logits and every tap of the cache, in the cache's dtype (fp16
    unless ``--cache-dtype float32``) on the CPU."""
    img = im.load()
    x, _ = to_tensors(img, img[..., 0], mean, std)
    taps = list(manifest["taps"])
    out = teacher_targets(teacher, taps, x[None].to(device))
    dtype = getattr(torch, manifest.get("dtype", "float16"))
    tensors = {f"{im.sha256}.{n}": t.cpu()  # encoded on the device: only K maps cross over
               for n, t in encode_logits(out.logits[0], int(manifest.get("topk", 0)), dtype).items()}
    for tap, value in out.features.items():
        tensors[f"{im.sha256}.{tap}"] = value[0].to(dtype).cpu().contiguous()
    return tensors


def _write_shard(path: Path, tensors: dict[str, Tensor], digest: str) -> str:
    """One shard written atomically with the key digest in its header; returns its sha256."""
    blob = save(tensors, metadata={KEY_META: digest})
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------------------------------- warping
def geometry_row(g: Geometry) -> Tensor:
    """A crop's :class:`~segkd.data.transforms.Geometry` as 11 int64 values (source h, w; scaled h, w; top, left;
    cropped h, w; out h, w; flipped): the form a batch carries to the device."""
    return torch.tensor([*g.source, *g.scaled, g.top, g.left, *g.cropped, *g.out, int(g.flipped)], dtype=torch.int64)


def stored_item(cache: TeacherCache, sha: str, g: Geometry, taps: Sequence[str] | None = None) -> StoredTargets:
    """What a DataLoader worker hands over for one crop: the image's stored tensors (compact, unwarped: all cached
    taps, or only ``taps``) and the crop's geometry, a batch of one (:meth:`StoredTargets.join` batches them)."""
    raw = cache.stored(sha, taps)
    return one_stored(raw, g, {"logits": 1, **{t: s for t, s in cache.taps.items() if t in raw}}, cache.num_classes,
                      cache.topk)


def one_stored(raw: dict[str, Tensor], g: Geometry, strides: dict[str, int], num_classes: int, topk: int
               ) -> StoredTargets:
    """A batch of one from an image's stored tensors (``C x h x w`` each) and its crop's geometry."""
    return StoredTargets({n: t[None] for n, t in raw.items()},
                         {n: torch.tensor([t.shape[-2:]], dtype=torch.int64) for n, t in raw.items()},
                         geometry_row(g)[None], strides, num_classes, topk)


def warp_stored(st: StoredTargets) -> TeacherTargets:
    """A batch's teacher targets from its stored maps, on their device: logits at the crops' pixel grid (the label
    grid, where the methods align logits by default), taps on their own stride; one ``grid_sample`` per tensor kind,
    in fp32 with autocast off (the targets are those of the fp32 per-crop warp whatever ``--amp`` says).

    A top-K cache is densified *before* the warp, at the stored (teacher-stride) resolution, and the dense ``C``
    maps are warped: interpolating the compact form is wrong (a bilinear mix of class indices 3 and 5 is class 4,
    and neighbouring cells hold different top-K sets, so mixing slot k of two cells mixes logits of different
    classes), and densify-then-warp is what the per-crop worker warp did, so a resumed run reads the same targets.
    Densifying costs ``C x h x w`` per image at the teacher's stride (64x fewer cells than the stride-1 warp output,
    which the loss needs anyway), and what crosses from the DataLoader stays compact (K values, K indices, 1 rest)."""
    maps, sizes = dict(st.maps), dict(st.sizes)
    with torch.no_grad(), torch.autocast(st.geometry.device.type, enabled=False):
        if st.topk:
            top, index, rest = (maps.pop(n) for n in TOPK_TENSORS)
            maps = {"logits": densify(top, index, rest, st.num_classes), **maps}
            sizes["logits"] = sizes["logits_top"]
        out = {n: warp_batch(m, st.geometry, sizes[n], st.strides[n]) for n, m in maps.items()}
    logits = out.pop("logits")
    return TeacherTargets(logits, out)


def warp_batch(m: Tensor, geometry: Tensor, sizes: Tensor, stride: int) -> Tensor:
    """Resample a batch of maps of whole source images (``B x C x h x w``, each covering its ``g.source``; image
    ``i``'s own map in the top-left ``sizes[i]`` cells, edge-padded beyond) onto each crop's grid of ``stride``-pixel
    cells, with the crop's exact scaling, offset and flip; 0 where the crop is padding. ``geometry``: ``B x 11``
    rows of :func:`geometry_row` (every crop of the same ``out`` size).

    Sampling is bilinear with ``align_corners=False`` at the cell centres: with ``stride=1``, no rescale and no
    crop it equals :func:`segkd.models.upsample_logits` of the map to the source size. The grid is computed in
    float64 and rounded once to float32, as the per-crop warp did, so a batch of equal-sized maps warps to the same
    values as each crop alone."""
    geo = geometry.to(torch.float64)
    out_h, out_w = int(geometry[0, 8]), int(geometry[0, 9])
    if bool((geometry[:, 8:10] != geometry[:1, 8:10]).any()):
        raise SegkdError("warp_batch: the crops of one batch must have one output size")
    gy, in_y = _axis(math.ceil(out_h / stride), stride, geo[:, 6], geo[:, 4], geo[:, 2], None, sizes[:, 0],
                     m.shape[-2])
    gx, in_x = _axis(math.ceil(out_w / stride), stride, geo[:, 7], geo[:, 5], geo[:, 3], geometry[:, 10].bool(),
                     sizes[:, 1], m.shape[-1])
    b, oh, ow = len(geo), gy.shape[1], gx.shape[1]
    grid = torch.stack((gx[:, None, :].expand(b, oh, ow), gy[:, :, None].expand(b, oh, ow)), dim=-1)
    out = F.grid_sample(m.float(), grid.to(torch.float32), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out * (in_y[:, :, None] & in_x[:, None, :]).to(out.dtype)[:, None]


def _axis(n: int, stride: int, cropped: Tensor, offset: Tensor, scaled: Tensor, flipped: Tensor | None,
          size: Tensor, padded: int) -> tuple[Tensor, Tensor]:
    """One axis of the sampling grid (``B x n``, ``grid_sample``'s [-1, 1] of a ``padded``-cell map) and which of its
    cells lie inside the crop (float64 throughout; see :func:`warp_batch`)."""
    c = (torch.arange(n, dtype=torch.float64, device=cropped.device) + 0.5) * stride - 0.5  # crop pixel coordinates
    inside = c[None] < (cropped - 0.5 + 1e-9)[:, None]
    src = c[None].expand(len(cropped), n)
    if flipped is not None:
        src = torch.where(flipped[:, None], cropped[:, None] - 1 - c[None], src)
    # scaled-image coordinates -> [-1, 1] of the image's own map (its grid size cancels out), then of the padded map
    g = ((src + offset[:, None] + 0.5) / scaled[:, None]) * 2 - 1
    size = size.to(torch.float64)[:, None]
    return torch.where(size == padded, g, (g + 1) * size / padded - 1), inside


def warp(m: Tensor, g: Geometry, stride: int) -> Tensor:
    """One map of a whole source image (``C x h x w``) warped onto one crop's grid (:func:`warp_batch`)."""
    sizes = torch.tensor([m.shape[-2:]], dtype=torch.int64)
    return warp_batch(m[None], geometry_row(g)[None], sizes, stride)[0]


def inside_mask(g: Geometry) -> Tensor:
    """``out``-sized bool map of the crop's real pixels (False on the bottom/right padding)."""
    m = torch.zeros(g.out, dtype=torch.bool)
    m[: g.cropped[0], : g.cropped[1]] = True
    return m


def cached_targets(cache: TeacherCache, sha: str, g: Geometry, taps: Sequence[str] | None = None
                   ) -> TeacherTargets:
    """One crop's teacher targets (``C x H x W`` logits, taps on their own stride): :func:`warp_stored` of its
    :func:`stored_item`, on the CPU (training batches are warped by the task, on the device)."""
    t = warp_stored(stored_item(cache, sha, g, taps))
    return TeacherTargets(t.logits[0], {k: v[0] for k, v in t.features.items()})
