#!/usr/bin/env python3
"""Fuzzes mpitrain's bad-input paths: configs, HDF5 shards and checkpoints (issue 10).

  fuzz.py [--config N] [--hdf5 N] [--checkpoint N] [--seed S] [--bin DIR] [--work DIR]
          [--jobs 2] [--only KIND:I,...] [--keep] [--timeout S] [--memory-limit MIB] [-v]

Kinds of case, and what passes:
  config      a mutated valid config (wrong types, unknown keys, out-of-range and huge values,
              missing keys and sections, deep nesting, non-UTF-8 bytes, JSON syntax errors,
              duplicate keys, bad --set arguments) through `train --dry-run`. Exit 0, or exit 2
              with a message naming the mutated key (its dotted path; for a model's own check
              `in "model.M"` and the option; for a path-valued key the path is enough), or, for
              a file that is not JSON, naming the file with a line >= the first changed line.
              A value outside the documented type or range (docs/config.md) must be refused.
              Exit 0 must print a resolved config that holds the mutated value, has
              batch.global = micro_batch x accumulation (one rank), and loads again to itself.
              A dry run writes nothing.
  hdf5        a byte-flipped / overwritten / truncated / extended copy of a valid shard, through
              `h5shard verify` and one epoch of `train` (glob or manifest). Each: exit 0, or
              exit 2 with a message naming the shard file.
  checkpoint  a mutated copy of a real checkpoint (flips, truncation, deleted or added files,
              edited JSON, the manifest edited; "resealed": mutated, then the manifest rewritten
              to match, which tests the readers behind the CRC check) through
              `train --resume DIR`. A checkpoint whose data files differ from the saved ones
              must be refused (exit 2) unless resealed; a refusal names the checkpoint
              directory and the file (or the manifest). The directory must be left unchanged.
Any case: killed by a signal, another exit code, a hang (--timeout) or a change to the shared
fixtures is a failure. Children run in the case's folder with TMPDIR there (Open MPI's session
files), under RLIMIT_DATA (--memory-limit) so a runaway allocation fails instead of taking the
machine. Writes to other absolute paths are not traced (no strace): the configs point run.dir
into the case folder and the shared inputs are compared before and after each case.

Case I of a kind draws from random.Random("SEED/KIND/I") alone, so `--only config:17` re-runs
that case; with the same --work it runs on the same fixture bytes (see Fixtures). Failed cases'
folders are kept (--keep keeps all). Standard library only.
"""

import argparse
import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("config", "hdf5", "checkpoint")
FIXTURE_VERSION = 1  # change it with anything that changes the fixtures' bytes
SHARD = "train-00000-of-00001.h5"  # h5shard's name for a one-shard set called train
CKPT_FILES = ("manifest.json", "model.safetensors", "optimizer.pt", "trainer.json", "rank-00000.json")
# Keys whose value names files: a message naming the file is as good as naming the key.
PATH_KEYS = {"data.train.files", "data.eval.files", "data.train.manifest", "data.eval.manifest", "model.init_from"}


class SetupError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The config schema, read from docs/config.md (kept equal to the code by test_config).


@dataclasses.dataclass
class Spec:
    path: str
    kind: str  # bool, int, num, str, strs, ints, nums
    lo: float = None
    lo_open: bool = False
    hi: float = None
    hi_open: bool = False
    choices: list = None
    min_items: int = 0
    max_items: int = None
    rule: str = None  # name, name_or_empty, nonempty
    words: list = None  # taken in place of a number or list ("auto")


def parse_range(text, spec):
    m = re.fullmatch(r" in ([\[(])([-\d.e]+), ([-\d.e]+)([\])])", text)
    if m:
        spec.lo, spec.lo_open = float(m.group(2)), m.group(1) == "("
        spec.hi, spec.hi_open = float(m.group(3)), m.group(4) == ")"
        return
    m = re.fullmatch(r" (>=|>|<=|<) ([-\d.e]+)", text)
    if m:
        if m.group(1).startswith(">"):
            spec.lo, spec.lo_open = float(m.group(2)), m.group(1) == ">"
        else:
            spec.hi, spec.hi_open = float(m.group(2)), m.group(1) == "<"
        return
    if text:
        raise SetupError("docs/config.md: cannot read the range %r" % text)


def parse_expected(path, text, models):
    words = None
    m = re.fullmatch(r'(.+), or (?:one of )?((?:"[^"]*"(?:, )?)+)', text)
    if m and not text.startswith("one of "):
        text, words = m.group(1), re.findall(r'"([^"]*)"', m.group(2))
    s = parse_plain(path, text, models)
    s.words = words
    return s


def parse_plain(path, text, models):
    s = Spec(path, "str")
    if text == "true or false":
        s.kind = "bool"
    elif text.startswith("one of "):
        s.choices = re.findall(r'"([^"]*)"', text)
    elif text == "a string or a list of strings":
        s.kind = "strs"
    elif text == "a string or a list of strings, none empty":
        s.kind, s.rule = "strs", "nonempty"
    elif text == "a string":
        pass
    elif text == "a file name without '/'":
        s.rule = "name"
    elif text == "a file name without '/', or empty":
        s.rule = "name_or_empty"
    elif text == "a non-empty path":
        s.rule = "nonempty"
    elif text == "the name of a registered model":
        s.choices = models
    elif text.startswith("an integer"):
        s.kind = "int"
        parse_range(text[len("an integer"):], s)
    elif text.startswith("a number"):
        s.kind = "num"
        parse_range(text[len("a number"):], s)
    else:
        m = re.fullmatch(r"a list of (integers|numbers)(.*?)"
                         r"(?:, (?:exactly (\d+) items|(\d+) to (\d+) items|at least (\d+) items?))?", text)
        if not m:
            raise SetupError("docs/config.md: %s: cannot read %r" % (path, text))
        s.kind = "ints" if m.group(1) == "integers" else "nums"
        parse_range(m.group(2), s)
        if m.group(3):
            s.min_items = s.max_items = int(m.group(3))
        elif m.group(4):
            s.min_items, s.max_items = int(m.group(4)), int(m.group(5))
        elif m.group(6):
            s.min_items = int(m.group(6))
    return s


def load_schema():
    rows = []
    with open(ROOT / "docs" / "config.md", encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^\| `([a-z0-9_.]+)` \| (.+?) \| `.*?` \| .* \|$", line.strip())
            if m:
                rows.append((m.group(1), m.group(2)))
    models = sorted({p.split(".")[1] for p, _ in rows if p.startswith("model.") and p.count(".") == 2})
    schema = {p: parse_expected(p, t, models) for p, t in rows}
    if len(schema) < 50 or "optimizer.lr" not in schema:
        raise SetupError("docs/config.md: found only %d settings" % len(schema))
    return schema


def sections_of(schema):
    out = {""}
    for p in schema:
        parts = p.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def children(schema, section):
    head = section + "." if section else ""
    return sorted({p[len(head):].split(".")[0] for p in schema if p.startswith(head)})


def as_int(v):
    """The integer nlohmann + schema.cpp's as_integer() would read, or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if -2**63 <= v < 2**63 else None  # larger ones parse as unsigned or double
    if isinstance(v, float) and math.isfinite(v) and v == math.floor(v) and abs(v) < 9e18:
        return int(v)
    return None


def in_range(x, s):
    if s.lo is not None and (x <= s.lo if s.lo_open else x < s.lo):
        return False
    if s.hi is not None and (x >= s.hi if s.hi_open else x > s.hi):
        return False
    return True


def scalar_ok(kind, v, s):
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        i = as_int(v)
        return i is not None and in_range(float(i), s)
    if kind == "num":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        x = float(v)  # a huge integer is a double to nlohmann too
        return math.isfinite(x) and in_range(x, s)
    if not isinstance(v, str):
        return False
    if s.choices is not None and v not in s.choices:
        return False
    if s.rule == "nonempty":
        return v != ""
    if s.rule in ("name", "name_or_empty"):
        if v == "":
            return s.rule == "name_or_empty"
        return v not in (".", "..") and "/" not in v
    return True


def valid(s, v):
    """Whether the documented type and range accept v (cross-key checks come on top)."""
    if s.words and isinstance(v, str):
        return v in s.words
    if s.kind in ("strs", "ints", "nums"):
        items = [v] if s.kind == "strs" and isinstance(v, str) else v
        if not isinstance(items, list) or len(items) < s.min_items:
            return False
        if s.max_items is not None and len(items) > s.max_items:
            return False
        item = {"strs": "str", "ints": "int", "nums": "num"}[s.kind]
        return all(scalar_ok(item, x, s) for x in items)
    return scalar_ok(s.kind, v, s)


def canonical(s, v):
    """The value as the resolved config holds it."""
    if s.words and isinstance(v, str):
        return v
    if s.kind == "int":
        return as_int(v)
    if s.kind == "num":
        return float(v)
    if s.kind == "strs":
        return [v] if isinstance(v, str) else v
    if s.kind == "ints":
        return [as_int(x) for x in v]
    if s.kind == "nums":
        return [float(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
# Running the programs.


@dataclasses.dataclass
class Run:
    name: str
    argv: list
    rc: int = None  # None: timed out; negative: killed by that signal
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


def child_env(case_dir):
    env = dict(os.environ)
    tmp = os.path.join(case_dir, "tmp")
    os.makedirs(tmp, exist_ok=True)
    env.update(TMPDIR=tmp, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    return env


def run(name, argv, cwd, timeout):
    r = Run(name, [str(a) for a in argv])
    start = time.monotonic()
    # Own session: on a timeout the whole group (the program and anything it forked) is killed.
    p = subprocess.Popen(r.argv, cwd=cwd, env=child_env(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        r.rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        r.rc = None
    r.seconds = time.monotonic() - start
    # surrogateescape: non-UTF-8 bytes the program echoes survive for the checks and display.
    r.stdout = out.decode("utf-8", "surrogateescape")
    r.stderr = err.decode("utf-8", "surrogateescape")
    return r


def error_text(r):
    """The error message: stderr from the first 'error:' line, without C++ backtrace frames."""
    lines = r.stderr.splitlines()
    for i, line in enumerate(lines):
        if "error:" in line:
            kept = [l for l in lines[i:] if not re.match(r"\s*(frame #|Exception raised from)", l)]
            return "\n".join(kept)
    return r.stderr


def exit_problem(r, allowed=(0, 2)):
    """A crash, hang or undocumented exit code, as a failure reason; None if the code is allowed."""
    if r.rc is None:
        return "%s hung (killed after the timeout)" % r.name
    if r.rc < 0:
        try:
            name = signal.Signals(-r.rc).name
        except ValueError:
            name = "signal %d" % -r.rc
        return "%s killed by %s" % (r.name, name)
    if r.rc not in allowed:
        return "%s exit %d (expected %s)" % (r.name, r.rc, " or ".join(map(str, allowed)))
    return None


def tree_state(root, skip=("tmp",)):
    """{relative path: (size, mtime_ns)} of every file and folder under root."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            state[os.path.normpath(os.path.join(rel, name))] = (st.st_size if name in filenames else 0, st.st_mtime_ns)
    return state


def diff_state(before, after):
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return changed


def file_digests(folder):
    return {n: hashlib.sha256(Path(folder, n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------
# Fixtures: small shards, valid base configs and a real checkpoint, made once per run.


class Fixtures:
    """Shards, base configs and a checkpoint, in WORK/fixtures.

    Every program runs two folders below the work folder (cases/NAME, fixtures/run-NAME) and
    names the fixtures by relative paths, so no file depends on where the work folder is. They
    are still not byte-for-byte the same from one build to the next (HDF5 stamps object times;
    LibTorch keys the optimizer state by tensor addresses), so a work folder's fixtures are
    reused while the programs and FIXTURE_VERSION are unchanged: `--work W --only KIND:I` then
    re-runs a case on exactly the bytes it failed on."""

    def __init__(self, work, bin_dir, timeout, kinds):
        self.dir = os.path.join(work, "fixtures")
        self.bin = bin_dir
        self.timeout = timeout
        self.schema = load_schema()
        self.sections = sections_of(self.schema)
        self.shards = {name: os.path.join(self.dir, "shards", name) for name in ("cls", "raw", "tok")}
        self.rel = {name: "../../fixtures/shards/" + name for name in self.shards}  # as the programs see them
        self.ckpt_run = os.path.join(self.dir, "run-the-checkpoint-run", "runs", "fuzz")

        programs = [os.path.join(bin_dir, p) for p in ("train", "h5shard")]
        stamp = {"programs": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in programs],
                 "version": FIXTURE_VERSION}
        ready = os.path.join(self.dir, "ready.json")
        try:
            with open(ready) as f:
                made = json.load(f)
        except (OSError, ValueError):
            made = {}
        reuse = made.get("stamp") == stamp and set(kinds) <= set(made.get("kinds", []))
        if not reuse:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
        self.make_sources(write=not reuse)
        if not reuse:
            self.h5shard("cls", ["idx", "--images", "idx/images", "--labels", "idx/labels", "--gzip", "4"])
            self.h5shard("raw", ["idx", "--images", "idx/images", "--labels", "idx/labels", "--gzip", "0"])
            self.h5shard("tok", ["text", "text.txt", "--level", "char", "--gzip", "0"])
        with open(self.shards["tok"] + "/train.json") as f:
            vocab = json.load(f)["metadata"]["vocab"]  # characters in token-id order
        self.vocab = len(vocab)
        self.token_ids = bytes(vocab.index(ch) for ch in self.text.decode())
        self.bases = {name: self.base(name) for name in ("mlp", "cnn", "gpt")}
        if not reuse:
            if "config" in kinds:
                for name, tree in self.bases.items():  # a mutation of a broken base would prove nothing
                    self.must_run("base config " + name, tree, ["--dry-run"])
            if "checkpoint" in kinds:
                self.must_run("the checkpoint run", self.bases["mlp"], [])  # checkpoints at steps 2 and 4
            with open(ready, "w") as f:
                json.dump({"stamp": stamp, "kinds": sorted(kinds)}, f)
        if "checkpoint" in kinds:
            for step in ("step-00000002", "step-00000004"):
                if not os.path.isfile(os.path.join(self.ckpt_run, "checkpoints", step, "manifest.json")):
                    raise SetupError("the checkpoint run made no %s" % step)
            # Cases resume from step 2; these are the bytes a damaged copy is compared with.
            self.ckpt_data = {n: Path(self.ckpt_run, "checkpoints/step-00000002", n).read_bytes() for n in CKPT_FILES}

    def make_sources(self, write):
        rng = random.Random(20251123)  # fixed: fixtures do not depend on --seed
        n, rows, cols = 256, 28, 28
        self.labels = bytes(rng.randrange(10) for _ in range(n))
        images = bytes(rng.randrange(256) for _ in range(n * rows * cols))
        words = ["data", "parallel", "rank", "shard", "step", "loss", "grad", "bucket", "epoch", "seed"]
        self.text = " ".join(rng.choice(words) for _ in range(700)).encode()
        if write:
            os.makedirs(os.path.join(self.dir, "idx"))
            Path(self.dir, "idx/images").write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images)
            Path(self.dir, "idx/labels").write_bytes(struct.pack(">II", 2049, n) + self.labels)
            Path(self.dir, "text.txt").write_bytes(self.text)

    def h5shard(self, name, args):
        argv = [os.path.join(self.bin, "h5shard")] + args + ["--out", "shards/" + name, "--chunk-size", "8K"]
        r = run("h5shard", argv, self.dir, self.timeout)
        if r.rc != 0:
            raise SetupError("h5shard %s failed (exit %s): %s" % (name, r.rc, r.stderr.strip()))

    def base(self, name):
        cls = self.rel["cls"]
        common = {"run": {"name": "fuzz", "dir": "runs", "seed": 3}, "precision": {"mode": "fp32"},
                  "device": {"kind": "cpu"}, "log": {"every_steps": 2, "console": False}}
        if name == "mlp":
            extra = {"model": {"name": "mlp", "mlp": {"input_dim": 784, "hidden": 16, "layers": 1, "num_classes": 10}},
                     "data": {"train": {"files": cls + "/" + SHARD}},
                     "batch": {"micro_batch": 16, "global": 32},
                     "optimizer": {"name": "adamw", "lr": 0.003},
                     "train": {"steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": 0}}
        elif name == "cnn":
            extra = {"model": {"name": "cnn", "cnn": {"in_channels": 1, "image_size": 28, "channels": [4, 8],
                                                       "num_classes": 10}},
                     "data": {"train": {"manifest": cls + "/train.json"},
                              "eval": {"files": self.rel["raw"] + "/" + SHARD}},
                     "batch": {"micro_batch": 16, "accumulation": 2},
                     "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
                     "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
                     "train": {"epochs": 1}, "eval": {"every_steps": 4, "max_batches": 2},
                     "ddp": {"bucket_mb": 1.0}}
        else:
            extra = {"model": {"name": "gpt", "gpt": {"vocab_size": self.vocab, "seq_len": 16, "n_layer": 1,
                                                       "n_head": 2, "n_embd": 16, "dropout": 0.1, "bias": False}},
                     "data": {"kind": "tokens", "train": {"files": self.rel["tok"] + "/" + SHARD,
                                                          "remainder": "wrap"}},
                     "batch": {"micro_batch": 8, "global": 16},
                     "optimizer": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.95], "grad_clip": 1.0},
                     "precision": {"mode": "fp32", "loss_scale": {"init": 1024.0}},
                     "train": {"steps": 3}}
        tree = copy.deepcopy(common)
        tree.update(copy.deepcopy(extra))
        return tree

    def must_run(self, what, tree, args):
        folder = os.path.join(self.dir, "run-" + re.sub(r"\W+", "-", what))
        os.makedirs(folder)
        with open(os.path.join(folder, "run.json"), "w") as f:
            json.dump(tree, f)
        r = run("train", [os.path.join(self.bin, "train"), "--config", "run.json"] + args, folder, self.timeout)
        if r.rc != 0:
            raise SetupError("%s: train exit %s: %s" % (what, r.rc, error_text(r).strip()[:2000]))
        return folder


# ---------------------------------------------------------------------------------------------
# Config cases.

# Placeholders replaced in the dumped text: values JSON cannot carry from Python (1e400, a
# 60000-deep list) and keys written twice.
RAW = "@@raw%d@@"

TYPE_POOL = ["abc", "", "1e3", "true", 1.5, 7, 0, -1, True, False, None, [], [1, 2], ["a"], {}, {"x": 1}]
HUGE_INTS = [2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), -(2**63) - 1]
HUGE_NUMS = [1e300, 1.7976931348623157e308, 5e-324, -1e300, 1e-300]
HUGE_RAW = ["1e400", "-1e400", "1" + "0" * 400]  # beyond a double: not representable at all
INVALID, VERBATIM = object(), object()
# --set texts and the value src/config/config.cpp's override_value() reads from each
# (INVALID: a type the key must refuse; VERBATIM: the text itself, as strings are taken).
SET_POOL = {
    "bool": [("true", True), ("false", False), ("True", INVALID), ("1", INVALID), ("yes", INVALID), ("", INVALID)],
    "int": [("0", 0), ("3.0", 3.0), ("1e3", 1000.0), ("1.5", 1.5), ("abc", INVALID), ("", INVALID),
            ("1e400", INVALID), ("nan", INVALID), ("inf", INVALID), ("9223372036854775807", 2**63 - 1),
            ("9223372036854775808", float(2**63)), ("5 ", INVALID), ("-1", -1)],
    "num": [("0", 0), (".5", 0.5), ("-0", 0), ("1e-400", INVALID), ("1e400", INVALID), ("nan", INVALID),
            ("inf", INVALID), ("-inf", INVALID), ("abc", INVALID), ("", INVALID), ("1e300", 1e300), ("0x10", 16.0)],
    "ints": [("[1,2]", [1, 2]), ("1,2", [1, 2]), ("[", INVALID), ("[1,", INVALID), ("a,b", INVALID),
             ("[[1]]", INVALID), ("[1.5]", [1.5]), ("", [])],
    "nums": [("[0.9, 0.95]", [0.9, 0.95]), ("0.9,0.95", [0.9, 0.95]), ("0.9", [0.9]), ("[", INVALID),
             ("a,b", INVALID), ("[[0.9]]", INVALID), ("", [])],
    "str": [(t, VERBATIM) for t in ("", "x", "a/b", "..", "\udcff", "x" * 100000, "=", "a=b")],
    "strs": [("a.h5", VERBATIM), ('["a.h5"]', ["a.h5"]), ("[1]", INVALID), ("[", INVALID), ("a,b", VERBATIM),
             ("\udcff", VERBATIM)],
}
SET_EMPTY = {"bool": INVALID, "int": INVALID, "num": INVALID, "ints": [], "nums": [], "str": "", "strs": ""}
SET_ONE = {"bool": INVALID, "int": 1, "num": 1, "ints": [1], "nums": [1], "str": "1", "strs": "1"}
# Invalid UTF-8: a bad start byte, a bad continuation, a surrogate, too long, overlong, lone ones.
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc0\xaf", b"\xfe\xfe"]
SYNTAX_INSERTS = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"#", b"\\", b"x", b"\x01"]
NOT_JSON_VALUES = [b"NaN", b"Infinity", b"-Infinity", b".5", b"01", b"+1", b"0x10", b"True", b"1."]
WORDS = ["foo", "learning_rate", "comment", "gpu", "ranks", "__proto__", "", " ", "ü", "a.b", "lr ", "LR", "x" * 300]


@dataclasses.dataclass
class ConfigCase:
    what: str
    text: bytes = None
    sets: list = dataclasses.field(default_factory=list)
    # What a refusal must name: key (the dotted key), key_or_file (either), quoted (the key
    # in quotes: unknown and duplicate keys), assignment (the --set argument), syntax (the file
    # and a line >= `line`), file (the file), deleted (some key under the deleted `key`).
    mode: str = "key"
    key: str = ""
    must_refuse: bool = False  # outside the documented type or range
    line: int = 1
    value: object = None  # the value written (a path-valued key may be named by it)
    has_value: bool = False  # value is valid: the resolved config must hold it


def set_path(tree, path, value):
    node = tree
    parts = path.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def get_path(tree, path):
    node = tree
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return KeyError
        node = node[p]
    return node


def present_paths(tree, sections, prefix=""):
    out = []
    for k, v in tree.items():
        p = prefix + "." + k if prefix else k
        out.append(p)
        if isinstance(v, dict) and p in sections:
            out += present_paths(v, sections, p)
    return out


def dump(tree, raws=()):
    text = json.dumps(tree, indent=2, ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace('"%s"' % (RAW % i), raw, 1)
    return text.encode("utf-8", "surrogatepass")


def shown(v):
    if isinstance(v, str) and len(v) >= 60:
        return '"%s..." (%d chars)' % (v[:20], len(v))
    s = json.dumps(v, ensure_ascii=True)
    return s if len(s) < 80 else s[:70] + "... (%d chars)" % len(s)


def valid_value(rng, s, fx):
    """A value the documented type and range accept."""
    if s.path in PATH_KEYS:
        return rng.choice(["", "missing.h5", "*.h5", "/", ".", "config.json", fx.rel["raw"] + "/" + SHARD,
                           fx.rel["tok"] + "/" + SHARD, fx.rel["cls"] + "/train.json", "x" * 300])
    if s.words and rng.random() < 0.5:
        return rng.choice(s.words)
    if s.kind == "bool":
        return rng.choice([True, False])
    if s.kind in ("int", "num"):
        lo = s.lo if s.lo is not None else 0.0
        hi = s.hi if s.hi is not None else lo + 100
        if s.kind == "int":
            lo_i = int(lo) + (1 if s.lo_open else 0)
            return rng.choice([lo_i, lo_i + 1, lo_i + 2, lo_i + 7, float(lo_i + 3)])
        span = hi - lo
        return rng.choice([lo + span * f for f in (1e-6, 0.25, 0.5, 0.999)] + ([lo] if not s.lo_open else []))
    if s.kind == "ints":
        return [rng.randint(1, 8) for _ in range(rng.randint(s.min_items, s.max_items or 4))]
    if s.kind == "nums":
        return [round(rng.random() * 0.99, 3) for _ in range(rng.randint(s.min_items, s.max_items or 4))]
    if s.choices:
        return rng.choice(s.choices)
    return rng.choice(["x", "run2", "ü-日本", "a b", "a\u0000b"] + (["runs/nested"] if s.rule is None else []))


def invalid_value(rng, s):
    """A value of the right JSON type that the documented range or choices refuse."""
    opts = []
    if s.words:
        w = rng.choice(s.words)
        opts += [w.upper(), w + " ", w[:-1], ""]
    if s.kind in ("int", "num"):
        if s.lo is not None:
            opts += [s.lo if s.lo_open else s.lo - 1, s.lo - 1e-9 if s.kind == "num" else int(s.lo) - 1]
        if s.hi is not None:
            opts += [s.hi if s.hi_open else s.hi + 0.5, s.hi + 1]
        if s.kind == "int":
            opts += [(s.lo or 0) + 10.5, 2.5]
    elif s.kind in ("ints", "nums"):
        opts += [[], [1] * ((s.max_items or 3) + 1), [-1.0] * max(s.min_items, 1)]
        if s.max_items and s.max_items > 1:
            opts += [[0.5]]
        if s.kind == "ints":
            opts += [[1.5] * max(s.min_items, 1)]
    elif s.choices:
        c = rng.choice(s.choices)
        opts += [c.upper(), c + " ", c[:-1], c[1:] + c[0], "", "none"]
    elif s.rule in ("name", "name_or_empty"):
        opts += ["a/b", "..", ".", "/"] + ([""] if s.rule == "name" else [])
    elif s.rule == "nonempty":
        opts += [""]
    elif s.kind == "bool":
        opts += ["true", 1, 0, "yes", None]
    elif s.kind == "strs":
        opts += [[1], [None], ["a", 2], {"a": 1}]
    opts = [v for v in opts if not valid(s, v)]
    return rng.choice(opts) if opts else rng.choice([None, {}, [{}]])


def typo(rng, word):
    if len(word) < 2:
        return word + "x"
    i = rng.randrange(len(word) - 1)
    return rng.choice([word[:i] + word[i + 1:], word[:i] + word[i + 1] + word[i] + word[i + 2:],
                       word[:i] + word[i] + word[i:], word + "s", word.upper(), word.replace("_", "")])


def nested(depth, kind):
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


def nth_line(text, offset):
    return text.count(b"\n", 0, offset) + 1


def strictly_invalid(data):
    """Whether nlohmann must refuse these bytes as JSON (Python's parser, made as strict)."""
    def no_constants(name):
        raise ValueError(name)
    try:
        json.loads(data.decode("utf-8"), parse_constant=no_constants)
        return False
    except (ValueError, UnicodeDecodeError):
        return True


def config_mutation(rng, fx, tree):
    schema = fx.schema
    keys = sorted(schema)
    op = rng.choices(["type", "range", "huge", "unknown", "missing", "nesting", "non_utf8", "syntax",
                      "duplicate", "section", "top", "set", "valid"],
                     weights=[12, 12, 12, 10, 8, 5, 6, 10, 5, 5, 2, 10, 8])[0]
    c = ConfigCase(what=op)
    raws = []

    if op in ("type", "range", "huge", "valid", "nesting"):
        key = rng.choice(keys)
        s = schema[key]
        if op == "type":
            value = rng.choice(TYPE_POOL)
        elif op == "range":
            value = invalid_value(rng, s)
        elif op == "valid":
            value = valid_value(rng, s, fx)
        elif op == "nesting":
            depth = rng.choices([8, 64, 1024, 8192, 60000], weights=[2, 2, 3, 3, 1])[0]
            raws.append(nested(depth, rng.choice(["list", "object"])))
            value = RAW % 0
        else:
            pool = {"int": HUGE_INTS, "num": HUGE_NUMS + HUGE_INTS[-3:], "ints": [[2**62], [2**63]],
                    "nums": [[1e300, 1e300]], "bool": ["x" * 1000000]}.get(s.kind)
            pool = pool or ["x" * 1000000, ["a.h5"] * 100000]
            value = rng.choice(pool)
            if s.kind in ("int", "num") and rng.random() < 0.3:
                raws.append(rng.choice(HUGE_RAW))
                value = RAW % 0
                c.mode = "key_or_file"
        set_path(tree, key, value)
        c.key = key
        if raws:
            c.what += " %s <- %s" % (key, raws[0][:12] + ("... (%d chars)" % len(raws[0]) if len(raws[0]) > 12 else ""))
            c.must_refuse = True
        else:
            c.what += " %s <- %s" % (key, shown(value))
            c.must_refuse = not valid(s, value)
            c.value, c.has_value = value, not c.must_refuse
        c.text = dump(tree, raws)
    elif op == "unknown":
        section = rng.choice(sorted(fx.sections))
        kids = children(schema, section)
        others = sorted({k.split(".")[-1] for k in keys} - set(kids))
        name = rng.choice([typo(rng, rng.choice(kids)), rng.choice(others), rng.choice(WORDS)])
        if name in kids:
            name += "_x"
        value = rng.choice([1, "x", True, None, {"y": 1}, [1]])
        if section:
            if not isinstance(get_path(tree, section), dict):
                set_path(tree, section, {})
            get_path(tree, section)[name] = value
        else:
            tree[name] = value
        c.key = section + "." + name if section else name
        c.mode, c.must_refuse = "quoted", True
        c.what += " %s = %s" % (json.dumps(c.key), shown(value))
        c.text = dump(tree)
    elif op == "missing":
        path = rng.choice(present_paths(tree, fx.sections))
        parent = get_path(tree, path.rpartition(".")[0]) if "." in path else tree
        del parent[path.split(".")[-1]]
        c.mode, c.key = "deleted", path
        c.what += " " + path
        c.text = dump(tree)
    elif op == "section":
        section = rng.choice(sorted(fx.sections - {""}))
        value = rng.choice([1, "x", [], [{}], None, True])
        set_path(tree, section, value)
        c.key, c.must_refuse = section, True
        c.what += " %s <- %s" % (section, shown(value))
        c.text = dump(tree)
    elif op == "duplicate":
        path = rng.choice(present_paths(tree, fx.sections))
        parent = get_path(tree, path.rpartition(".")[0]) if "." in path else tree
        name = path.split(".")[-1]
        parent[RAW % 0] = parent[name]
        c.text = dump(tree).replace(('"%s"' % (RAW % 0)).encode(), json.dumps(name).encode(), 1)
        c.key, c.mode, c.must_refuse = path, "quoted", True
        c.what += " " + path
    elif op == "top":
        value = rng.choice([[], 1, "x", None, True, [tree]])
        c.text, c.mode, c.must_refuse = dump(value), "file", True
        c.what += " " + shown(value)
    elif op == "non_utf8":
        text = dump(tree)
        bad = rng.choice(BAD_UTF8)
        strings = list(re.finditer(rb'"(?:[^"\\]|\\.)*"', text))
        where = rng.choice(["string", "string", "between"])
        if where == "string":
            m = rng.choice(strings)
            at = rng.randint(m.start() + 1, m.end() - 1)
        else:
            at = rng.choice([m.start() for m in re.finditer(rb"\s", text)] or [0])
        c.text = text[:at] + bad + text[at:]
        c.mode, c.line, c.must_refuse = "syntax", nth_line(c.text, at), True
        c.what += " %r at byte %d (%s)" % (bad, at, where)
    elif op == "syntax":
        text = dump(tree)
        for _ in range(50):
            how = rng.choice(["truncate", "delete", "insert", "trailing comma", "comment", "constant", "quote",
                              "empty"])
            at = rng.randrange(len(text))
            if how == "truncate":
                data = text[:at]
            elif how == "delete":
                at = rng.choice([m.start() for m in re.finditer(rb'[{}\[\]:,"]', text)])
                data = text[:at] + text[at + 1:]
            elif how == "insert":
                data = text[:at] + rng.choice(SYNTAX_INSERTS) + text[at:]
            elif how == "trailing comma":
                at = rng.choice([m.start() for m in re.finditer(rb"\n\s*[}\]]", text)])
                data = text[:at] + b"," + text[at:]
            elif how == "comment":
                at = rng.choice([m.start() + 1 for m in re.finditer(rb"\n", text)])
                data = text[:at] + b"// a comment\n" + text[at:]
            elif how == "constant":
                m = rng.choice(list(re.finditer(rb"(?<=: )(-?\d[\d.eE+-]*|true|false)", text)))
                at = m.start()
                data = text[:at] + rng.choice(NOT_JSON_VALUES) + text[m.end():]
            elif how == "quote":
                m = rng.choice(list(re.finditer(rb'"[a-z_]+"', text)))
                at = m.start()
                data = text[:at] + b"'" + text[at + 1:m.end() - 1] + b"'" + text[m.end():]
            else:
                at, data = 0, rng.choice([b"", b"   \n", b"\n\n"])
            if strictly_invalid(data):
                break
        else:
            at, data, how = len(text) // 2, text[:len(text) // 2], "truncate"
        c.text, c.mode, c.line, c.must_refuse = data, "syntax", nth_line(data, at), True
        c.what += " %s at byte %d" % (how, at)
    else:  # set: the same kinds of trouble through --set arguments
        c.text = dump(tree)
        key = rng.choice(keys)
        s = schema[key]
        roll = rng.random()
        if roll < 0.2:  # a malformed assignment
            a = rng.choice([key, "=1", "", key + "=", key.rpartition(".")[0] + "=1", key + ".x=1",
                            key.replace(".", "..", 1) + "=1", "." + key + "=1", typo(rng, key) + "=1",
                            rng.choice(WORDS) + "=1"])
            named, eq, text = a.partition("=")
            if eq and named in schema:  # a typo that made another real key, or an empty value
                parsed = SET_ONE[schema[named].kind] if text else SET_EMPTY[schema[named].kind]
                c.sets, c.key, c.value = [a], named, text
                c.must_refuse = parsed is INVALID or not valid(schema[named], parsed)
            else:
                c.sets, c.mode, c.key, c.must_refuse = [a], "assignment", a, True
        else:
            text, parsed = rng.choice(SET_POOL[s.kind])
            parsed = text if parsed is VERBATIM else parsed
            c.sets, c.key, c.value = ["%s=%s" % (key, text)], key, text
            # Non-UTF-8 bytes (\udcff is the byte 0xff): refusing them is open, crashing is not.
            c.must_refuse = parsed is INVALID or ("\udcff" not in text and not valid(s, parsed))
        c.what += " --set %s" % shown(c.sets[0])
    return c


def names_key(msg, key, fx, value=None):
    """Whether an error message names the config key (see the module doc for what counts)."""
    if re.search(r"(?<![\w.])" + re.escape(key) + r"(?!\w)", msg):
        return True
    parts = key.split(".")
    # A model's own check: 'in "model.gpt": n_embd (7) must be a multiple of n_head (2)'.
    if len(parts) == 3 and parts[0] == "model" and '"model.%s"' % parts[1] in msg and re.search(
            r"\b%s\b" % re.escape(parts[2]), msg):
        return True
    if key in PATH_KEYS and value is not None:
        # The path itself, or for a manifest one of its shards (they live in its folder).
        items = value if isinstance(value, list) else [value]
        return any(isinstance(v, str) and v and ("'%s'" % v in msg or '"%s"' % v in msg or (
            v.endswith(".json") and "'%s/" % os.path.dirname(v) in msg)) for v in items)
    return False


def judge_config(c, r, fx):
    problem = exit_problem(r)
    if problem:
        return problem
    msg = error_text(r)
    if r.rc == 0:
        if c.must_refuse:
            return "exit 0: accepted a value outside the documented type or range"
        return None
    if c.mode == "key" and not names_key(msg, c.key, fx, c.value):
        return "exit 2, but the message does not name %s" % c.key
    if c.mode == "key_or_file" and not (names_key(msg, c.key, fx) or '"config.json"' in msg):
        return "exit 2, but the message names neither %s nor config.json" % c.key
    if c.mode == "quoted" and json.dumps(c.key, ensure_ascii=False) not in msg:
        return "exit 2, but the message does not name %s" % json.dumps(c.key)
    if c.mode == "assignment" and '--set "%s"' % c.key not in msg:
        return "exit 2, but the message does not name the argument --set %s" % json.dumps(c.key)
    if c.mode in ("syntax", "file") and '"config.json"' not in msg:
        return "exit 2, but the message does not name the file config.json"
    if c.mode == "syntax":
        m = re.search(r"line (\d+), column (\d+)", msg)
        if not m:
            return "exit 2, but the message gives no line and column"
        if int(m.group(1)) < c.line:
            return "the message points at line %s, before the change on line %d" % (m.group(1), c.line)
    if c.mode == "deleted":
        named = re.findall(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+", msg)
        if not names_key(msg, c.key, fx) and not any(n.startswith(c.key + ".") for n in named):
            return "exit 2, but the message names no key under the deleted %s" % c.key
    return None


def resolved_of(r):
    _, sep, rest = r.stdout.partition("resolved config:\n")
    if not sep:
        return None
    try:
        return json.loads(rest)
    except ValueError:
        return None


def check_resolved(c, r, fx, case_dir, timeout, runs):
    """A dry run that passed: its resolved config must hold what was asked and load again."""
    tree = resolved_of(r)
    if tree is None:
        return "exit 0, but no resolved config (valid JSON) on stdout"
    b = tree.get("batch", {})
    if b.get("global") != b.get("micro_batch", 0) * b.get("accumulation", 0):
        return "resolved batch.global %s != micro_batch %s x accumulation %s x 1 rank" % (
            b.get("global"), b.get("micro_batch"), b.get("accumulation"))
    if c.has_value and not (fx.schema[c.key].words and isinstance(c.value, str) and c.value == "auto"):
        # "auto" is replaced by the value the trainer chose.
        got = get_path(tree, c.key)
        if got is not KeyError and got != canonical(fx.schema[c.key], c.value):
            return "resolved %s is %s, the config said %s" % (c.key, shown(got), shown(c.value))
    with open(os.path.join(case_dir, "resolved.json"), "w") as f:
        json.dump(tree, f, indent=2)
    # docs/config.md: "A saved config is a valid config file ... gives the same fingerprint".
    before = tree_state(case_dir)
    again = run("train --dry-run (resolved config)", [os.path.join(fx.bin, "train"), "--config", "resolved.json",
                                                     "--dry-run"], case_dir, timeout)
    runs.append(again)
    problem = exit_problem(again, allowed=(0,))
    if problem:
        return "the printed resolved config does not load again: " + problem
    if resolved_of(again) != tree:
        return "the printed resolved config resolves to something else when loaded again"
    written = diff_state(before, tree_state(case_dir))
    if written:
        return "the dry run wrote %s" % ", ".join(written[:5])
    return None


def config_case(fx, seed, index, case_dir, timeout):
    rng = random.Random("%s/config/%d" % (seed, index))
    base = rng.choice(sorted(fx.bases))
    c = config_mutation(rng, fx, copy.deepcopy(fx.bases[base]))
    c.what = "%s: %s" % (base, c.what)
    with open(os.path.join(case_dir, "config.json"), "wb") as f:
        f.write(c.text)
    sets = [a for s in c.sets for a in ("--set", s)]
    before = tree_state(case_dir)
    r = run("train --dry-run", [os.path.join(fx.bin, "train"), "--config", "config.json", "--dry-run"] + sets,
            case_dir, timeout)
    problems = []
    p = judge_config(c, r, fx)
    if p:
        problems.append(p)
    written = diff_state(before, tree_state(case_dir))
    if written:
        problems.append("the dry run wrote %s" % ", ".join(written[:5]))
    runs = [r]
    if not problems and r.rc == 0:
        p = check_resolved(c, r, fx, case_dir, timeout, runs)
        if p:
            problems.append(p)
    return c.what, runs, problems


# ---------------------------------------------------------------------------------------------
# HDF5 cases.


def region(rng, data, name, fx):
    n = len(data)
    where = rng.choice(["head", "head", "tail", "any", "data"])
    if where == "data":
        # Uncompressed shards hold the targets / tokens verbatim: find them.
        stored = {"raw": fx.labels, "tok": fx.token_ids}.get(name)
        at = data.find(stored[:64]) if stored else -1
        if at >= 0:
            return "data", at, min(n, at + len(stored))
        where = "any"
    if where == "head":
        return where, 0, min(n, 4096)
    if where == "tail":
        return where, max(0, n - 4096), n
    return where, 0, n


def mutate_bytes(rng, data, name, fx):
    """A damaged copy of a file and what was done to it."""
    data = bytearray(data)
    n = len(data)
    op = rng.choices(["flip", "set", "zero", "truncate", "append", "swap", "foreign"],
                     weights=[30, 15, 10, 20, 5, 5, 3])[0]
    where, lo, hi = region(rng, data, name, fx)
    if op == "flip":
        k = rng.choice([1, 1, 2, 4, 8, 32])
        offsets = sorted(rng.randrange(lo, hi) for _ in range(k))
        for o in offsets:
            data[o] ^= rng.randrange(1, 256)
        what = "flip %d byte(s) in %s at %s" % (k, where, offsets[:4])
    elif op == "set":
        k = rng.choice([1, 2, 4, 8])
        o = rng.randrange(lo, max(lo + 1, hi - k))
        fill = rng.choice([b"\x00" * k, b"\xff" * k, b"\x7f" + b"\xff" * (k - 1), b"\x80" + b"\x00" * (k - 1),
                           bytes(rng.randrange(256) for _ in range(k))])
        data[o:o + k] = fill
        what = "set %d byte(s) at %d (%s) to %s" % (k, o, where, fill.hex())
    elif op == "zero":
        size = rng.choice([16, 256, 4096])
        o = rng.randrange(lo, hi)
        data[o:o + size] = bytes(len(data[o:o + size]))
        what = "zero %d bytes at %d (%s)" % (size, o, where)
    elif op == "truncate":
        to = rng.choice([0, 1, 8, rng.randrange(min(n, 4096)), rng.randrange(n), n - 1])
        del data[to:]
        what = "truncate to %d of %d bytes" % (to, n)
    elif op == "append":
        extra = rng.choice([bytes(rng.randint(1, 4096)), bytes(rng.randrange(256) for _ in range(rng.randint(1, 512)))])
        data += extra
        what = "append %d bytes" % len(extra)
    elif op == "swap":
        a, b = sorted(rng.sample(range(0, n - 512, 512), 2))
        data[a:a + 512], data[b:b + 512] = data[b:b + 512], data[a:a + 512]
        what = "swap 512-byte blocks at %d and %d" % (a, b)
    else:
        head = rng.choice([b"PK\x03\x04", b'{"format": "mpitrain-shards"}', b"\x89PNG\r\n\x1a\n"])
        data[:len(head)] = head
        what = "overwrite the start with %r" % head[:8]
    if bytes(data) == bytes(fx_original(fx, name)):  # e.g. a set to the same bytes: flip one instead
        data[lo] ^= 1
        what += ", then flip byte %d" % lo
    return bytes(data), what


def fx_original(fx, name):
    return Path(fx.shards[name], SHARD).read_bytes()


def hdf5_case(fx, seed, index, case_dir, timeout):
    rng = random.Random("%s/hdf5/%d" % (seed, index))
    name = rng.choice(["cls", "raw", "tok"])
    via = rng.choice(["files", "manifest"])
    data, what = mutate_bytes(rng, fx_original(fx, name), name, fx)
    with open(os.path.join(case_dir, SHARD), "wb") as f:
        f.write(data)
    if via == "manifest":  # the manifest names the shard relative to its own folder
        shutil.copy(os.path.join(fx.shards[name], "train.json"), os.path.join(case_dir, "train.json"))
        source = "train.json"
    else:
        source = SHARD
    tree = copy.deepcopy(fx.bases["gpt" if name == "tok" else "mlp"])
    tree["data"]["train"] = {"manifest" if via == "manifest" else "files": source}
    tree["train"] = {"epochs": 1, "steps": 0}  # every sample read once
    tree["checkpoint"] = {"every_steps": 0}
    tree["log"] = {"console": False, "metrics_file": ""}
    with open(os.path.join(case_dir, "run.json"), "w") as f:
        json.dump(tree, f, indent=2)
    runs = [run("h5shard verify", [os.path.join(fx.bin, "h5shard"), "verify", source], case_dir, timeout),
            run("train (one epoch)", [os.path.join(fx.bin, "train"), "--config", "run.json"], case_dir, timeout)]
    problems = []
    for r in runs:
        p = exit_problem(r)
        if p:
            problems.append(p)
        elif r.rc == 2 and SHARD not in error_text(r):
            problems.append("%s exit 2, but the message does not name the shard %s" % (r.name, SHARD))
    return "%s via %s: %s" % (name, via, what), runs, problems


# ---------------------------------------------------------------------------------------------
# Checkpoint cases.


JSON_VALUES = ["x", "", None, True, -1, 0, 2**63, 2**64, 1e300, -1e300, 1.5, [], {}, [1] * 3, 300, {"a": [1]}]


def json_edit(rng, data):
    """An edited JSON document: a key deleted or renamed, or a value replaced."""
    doc = json.loads(data)
    path, node = [], doc
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.6):
        k = rng.choice(sorted(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(k)
        node = node[k]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1] if path else None
    op = rng.choice(["delete", "rename", "value", "value", "value"]) if isinstance(parent, dict) and path else "value"
    if op == "delete":
        del parent[last]
        what = "delete %s" % "/".join(map(str, path))
    elif op == "rename":
        parent[str(last) + "_x"] = parent.pop(last)
        what = "rename %s" % "/".join(map(str, path))
    else:
        value = rng.choice(JSON_VALUES)
        if path:
            parent[last] = value
        else:
            doc = value
        what = "set %s to %s" % ("/".join(map(str, path)) or "the document", shown(value))
    return json.dumps(doc, indent=2).encode(), what


def reseal(folder):
    """Rewrites the manifest over the files now present, as a writer that trusted them would."""
    path = os.path.join(folder, "manifest.json")
    manifest = json.loads(Path(path).read_text())
    files = {}
    for name in manifest["files"]:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            data = Path(p).read_bytes()
            files[name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    manifest["files"] = files
    Path(path).write_text(json.dumps(manifest, indent=2))


def checkpoint_case(fx, seed, index, case_dir, timeout):
    rng = random.Random("%s/checkpoint/%d" % (seed, index))
    run_dir = os.path.join(case_dir, "runs", "fuzz")
    shutil.copytree(fx.ckpt_run, run_dir)
    target = os.path.join(run_dir, "checkpoints", "step-00000002")
    op = rng.choices(["flip", "truncate", "delete", "append", "json", "drop entry", "drop entry + damage",
                      "extra file", "resealed"], weights=[20, 12, 8, 5, 15, 5, 8, 4, 23])[0]
    resealed = op == "resealed"
    if resealed:
        op = rng.choice(["flip", "flip", "truncate", "delete", "json", "json"])
    files = [f for f in CKPT_FILES if not (resealed and f == "manifest.json")]
    name = rng.choice(files if op != "json" else [f for f in files if f.endswith(".json")])
    path = os.path.join(target, name)
    data = bytearray(Path(path).read_bytes())

    def damage(kind, data):
        if kind == "flip":
            header = name == "model.safetensors" and rng.random() < 0.5  # its length and JSON header
            k = rng.choice([1, 1, 2, 4, 8])
            span = min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]))[0]) if header else len(data)
            offsets = sorted(rng.randrange(span) for _ in range(k))
            for o in offsets:
                data[o] ^= rng.randrange(1, 256)
            return data, "flip %d byte(s) at %s" % (k, offsets[:4])
        if kind == "truncate":
            to = rng.choice([0, 1, len(data) // 2, len(data) - 1, rng.randrange(len(data))])
            return data[:to], "truncate to %d of %d bytes" % (to, len(data))
        if kind == "append":
            extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            return data + extra, "append %d bytes" % len(extra)
        return None, "delete"

    if op in ("flip", "truncate", "append", "delete"):
        new, what = damage(op, data)
    elif op == "json":
        new, what = json_edit(rng, bytes(data))
    elif op.startswith("drop entry"):
        name = rng.choice(CKPT_FILES[1:])
        manifest = json.loads(Path(target, "manifest.json").read_text())
        del manifest["files"][name]
        Path(target, "manifest.json").write_text(json.dumps(manifest, indent=2))
        what = "drop the manifest entry"
        path, data = os.path.join(target, name), bytearray(Path(target, name).read_bytes())
        new = data
        if op.endswith("damage"):
            new, how = damage(rng.choice(["flip", "truncate", "delete"]), data)
            what += ", then " + how
    else:
        name = rng.choice(["notes.txt", "rank-00001.json", ".hidden", "model.safetensors.bak"])
        path, new, what = os.path.join(target, name), b"{}", "add a file"
    if new is None:
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(bytes(new))
    if resealed:
        reseal(target)
    what = "%s%s: %s" % ("resealed " if resealed else "", name, what)

    # The contract: any data file that differs from the one saved is refused, unless the
    # manifest was rewritten to match it (then the readers must still fail cleanly).
    damaged = [n for n in CKPT_FILES[1:] if not os.path.exists(os.path.join(target, n))
               or Path(target, n).read_bytes() != fx.ckpt_data[n]]
    must_refuse = bool(damaged) and not resealed

    tree = copy.deepcopy(fx.bases["mlp"])
    with open(os.path.join(case_dir, "run.json"), "w") as f:
        json.dump(tree, f, indent=2)
    before = file_digests(target)
    r = run("train --resume", [os.path.join(fx.bin, "train"), "--config", "run.json", "--resume", target],
            case_dir, timeout)
    problems = []
    p = exit_problem(r)
    if p:
        problems.append(p)
    elif r.rc == 0 and must_refuse:
        problems.append("exit 0: resumed from a checkpoint whose %s differ(s) from the saved file(s)" %
                        ", ".join(damaged))
    elif r.rc == 2:
        msg = error_text(r)
        if target not in msg:
            problems.append("exit 2, but the message does not name the checkpoint directory")
        elif name == "manifest.json" and re.search(r"cannot be used: (file \S+|\S*manifest)", msg):
            pass  # verify() read the edited manifest and says what does not match it
        elif not any(n in msg for n in (name, "manifest") + CKPT_FILES):
            problems.append("exit 2, but the message does not say which file is wrong")
    after = file_digests(target)
    if after != before:
        problems.append("the attempt changed the checkpoint: %s" % ", ".join(
            sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))
    return what, [r], problems


# ---------------------------------------------------------------------------------------------
# Driver.

CASES = {"config": config_case, "hdf5": hdf5_case, "checkpoint": checkpoint_case}


@dataclasses.dataclass
class Outcome:
    kind: str
    index: int
    what: str
    runs: list
    problems: list
    seconds: float
    note: str = ""  # the first line of the last refusal, for --verbose


def first_lines(r, n=3):
    text = error_text(r) if r.rc else (r.stderr or r.stdout)
    lines = [l for l in text.splitlines() if l.strip()][:n] or ["(no output)"]
    shorten = lambda l: l if len(l) <= 240 else l[:240] + "... (%d chars)" % len(l)
    return "\n".join(shorten(l.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")) for l in lines)


def run_case(fx, args, kind, index):
    case_dir = os.path.join(args.work, "cases", "%s-%d" % (kind, index))
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    start = time.monotonic()
    shared = tree_state(fx.dir)
    try:
        what, runs, problems = CASES[kind](fx, args.seed, index, case_dir, args.timeout)
    except Exception as e:  # a bug in this script must not pass for a bug in mpitrain
        what, runs, problems = "(the fuzzer failed to make the case)", [], ["fuzz.py: %s: %s" % (type(e).__name__, e)]
    changed = diff_state(shared, tree_state(fx.dir))
    if changed:
        problems.append("the shared fixtures changed during the case: %s" % ", ".join(changed[:5]))
    refusals = [r for r in runs if r.rc]
    note = first_lines(refusals[-1], 1) if refusals else ""
    if not problems:
        for r in runs:  # outputs are kept for failures only (a thousand dry runs print a lot)
            r.stdout = r.stderr = ""
        if not args.keep:
            shutil.rmtree(case_dir, ignore_errors=True)
    return Outcome(kind, index, what, runs, problems, time.monotonic() - start, note)


def group_of(o):
    """A failure's signature, so a thousand cases of one bug read as one line."""
    reason = o.problems[0]
    r = next((r for r in o.runs if r.rc not in (0, 2)), o.runs[-1] if o.runs else None)
    head = re.sub(r"^\[mpitrain [^]]*\] error: |^h5shard: error: ", "", first_lines(r, 1) if r else "")
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", head)
    head = re.sub(r"\d+", "N", head)[:70]
    return "%s | %s" % (reason, head)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=int, default=0, metavar="N", help="config cases")
    parser.add_argument("--hdf5", type=int, default=0, metavar="N", help="HDF5 shard cases")
    parser.add_argument("--checkpoint", type=int, default=0, metavar="N", help="checkpoint cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bin", default=os.environ.get("BIN", str(ROOT / "build" / "bin")),
                        help="folder of train and h5shard (default: $BIN, else build/bin)")
    parser.add_argument("--work", help="work folder (default: a new temporary one, removed at the end unless a case failed)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--only", help="run only these cases, e.g. config:17,hdf5:3 (counts are ignored)")
    parser.add_argument("--keep", action="store_true", help="keep every case folder (failed ones are kept anyway)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds one program may run (a hang fails)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print one line per case")
    parser.add_argument("--memory-limit", type=int, default=2048, metavar="MIB",
                        help="RLIMIT_DATA of the programs (0: none)")
    args = parser.parse_args()

    if args.only:
        todo = []
        for item in args.only.split(","):
            kind, _, index = item.partition(":")
            if kind not in KINDS or not index.isdigit():
                parser.error("--only: expected KIND:INDEX, got %r" % item)
            todo.append((kind, int(index)))
    else:
        todo = [(k, i) for k in KINDS for i in range(getattr(args, k))]
    if not todo:
        parser.error("nothing to do: give --config, --hdf5 and/or --checkpoint N")
    args.bin = os.path.abspath(args.bin)
    for program in ("train", "h5shard"):
        if not os.access(os.path.join(args.bin, program), os.X_OK):
            parser.error("%s/%s is not a program (--bin)" % (args.bin, program))
    temporary = args.work is None
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="mpitrain-fuzz-"))
    os.makedirs(args.work, exist_ok=True)
    if args.memory_limit:  # inherited by every program started from here
        limit = args.memory_limit << 20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    start = time.monotonic()
    kinds = {k for k, _ in todo}
    try:
        fx = Fixtures(args.work, args.bin, args.timeout, kinds)
    except SetupError as e:
        print("fuzz: cannot set up: %s" % e, file=sys.stderr)
        return 1
    setup_s = time.monotonic() - start
    outcomes = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_case, fx, args, k, i) for k, i in todo]
        for f in concurrent.futures.as_completed(futures):
            outcomes.append(f.result())
            if sys.stdout.isatty():
                print("\r%d/%d cases" % (len(outcomes), len(todo)), end="", flush=True)
    if sys.stdout.isatty():
        print()
    outcomes.sort(key=lambda o: (KINDS.index(o.kind), o.index))
    wall = time.monotonic() - start

    failed = [o for o in outcomes if o.problems]
    if args.verbose:
        for o in outcomes:
            codes = ",".join("T" if r.rc is None else str(r.rc) for r in o.runs)
            print("%-14s %-4s exit %-6s %s\n%21s%s" % ("%s:%d" % (o.kind, o.index), "FAIL" if o.problems else "ok",
                                                     codes, o.what[:150], "", o.note[:150]))
    print("%-11s %6s %7s %12s %9s %10s" % ("kind", "cases", "ran ok", "refused (2)", "failures", "seconds"))
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        ok = sum(1 for o in mine if not o.problems and all(r.rc == 0 for r in o.runs))
        bad = sum(1 for o in mine if o.problems)
        print("%-11s %6d %7d %12d %9d %10.0f" % (kind, len(mine), ok, len(mine) - ok - bad, bad,
                                                 sum(o.seconds for o in mine)))
    print("seed %d, %d job(s); wall time %.0f s (fixtures %.0f s); work folder %s" % (
        args.seed, args.jobs, wall, setup_s, args.work))

    if failed:
        groups = {}
        for o in failed:
            groups.setdefault((o.kind, group_of(o)), []).append(o)
        print("\n%d failing case(s) in %d group(s):" % (len(failed), len(groups)))
        for (kind, sig), members in sorted(groups.items(), key=lambda g: (KINDS.index(g[0][0]), -len(g[1]))):
            ids = ", ".join("%s:%d" % (o.kind, o.index) for o in members[:12])
            print("  %3d x %s  [%s%s]" % (len(members), sig, ids, ", ..." if len(members) > 12 else ""))
        print("\nFailing cases (re-run one with: %s --seed %d --bin %s --work %s --only KIND:I):" % (
            os.path.relpath(__file__), args.seed, args.bin, args.work))
        for o in failed:
            print("\n%s:%d  %s" % (o.kind, o.index, o.what))
            for p in o.problems:
                print("  FAIL: %s" % p)
            for r in o.runs:
                command = " ".join([os.path.basename(r.argv[0])] + r.argv[1:])
                print("  $ %s  -> %s (%.1f s)" % (command[:200], "timeout" if r.rc is None else
                                                   "exit %d" % r.rc, r.seconds))
                print("    " + first_lines(r).replace("\n", "\n    "))
            print("  folder: %s" % os.path.join(args.work, "cases", "%s-%d" % (o.kind, o.index)))
    elif temporary and not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
