#!/usr/bin/env python3
"""Checks that what README.md, docs/*.md and examples/*/README.md show still exists.

  check_docs.py --source SOURCE_DIR --bin BUILD_BIN_DIR

For each page:
  (a) every relative link ([text](path), [text]: path) points to an existing file or folder;
  (b) every path under scripts/, launch/, bench/, examples/, src/, include/, tests/, docs/ and
      cmake/ written in code exists in the source tree (globs must match something), and every
      build/bin/NAME is a program the build made;
  (c) every --flag written after one of mpitrain's programs (train, h5shard and its
      subcommands, bench_*, the examples' programs) is in that program's --help, and every
      --flag written after a script (scripts/..., launch/...) is in the script's text;
  (d) every config key written in code is a real key (the tables of docs/config.md, which the
      test "docs/config.md lists every setting" keeps equal to the code): the --set KEY=VALUE
      arguments of the commands of (c) and code spans `--set KEY=VALUE`, <KEY> placeholders,
      code spans that are a key, and the keys of JSON blocks that are configs. (A --set inside
      a quoted error message is not a command, and not checked.)

Where code counts as a key (d): a code span counts when it is `KEY`, `"KEY"` or `KEY=VALUE`
and the config's own "did you mean" rule would take it for a key: its first part is a
section, and either its parent is not a known section or its last part is a known key's name
or is close to the name of a key in the same section (src/config/schema.cpp, closest()). So
file names such as `model.safetensors` or `device.h` are not keys, and `optimizer.lrr` is
reported. Model options count for built-in models and for models registered by the examples
or by the page itself (a register_model({"name", ...}) in its code).

Commands (c) are read from shell code blocks (sh, bash, shell, console or no language) and
code spans. A command's program is its first word (after VAR=value words), or, after a
launcher (mpirun, mpiexec, srun, sbatch, salloc, env, time, exec, bash, sh), the first word
that names a program. Lines ending in a backslash, and indented lines starting with [-- or --,
continue the command above. Words after a lone -- are another program's and not checked.

Prints one line per problem (file:line: what) and exits 1 if there is any.
"""

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shlex
import subprocess
import sys

SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
LAUNCHERS = {"mpirun", "mpiexec", "srun", "sbatch", "salloc", "env", "time", "exec", "bash", "sh"}
PATH_ROOTS = ("scripts", "launch", "bench", "examples", "src", "include", "tests", "docs", "cmake")
PATH_RE = re.compile(r"(?<![\w./$~{}-])((?:%s)/[\w.*/-]*)" % "|".join(PATH_ROOTS))
BIN_RE = re.compile(r"(?<![\w./$~{}-])build/bin/([\w.-]+)")
KEY = r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+"
SET_SPAN_RE = re.compile(r"^--set[ =]+[\"']?(%s)=\S*[\"']?$" % KEY)
PLACEHOLDER_RE = re.compile(r"<(%s)>" % KEY)
SPAN_KEY_RE = re.compile(r'^"?(%s)"?(?:=\S*)?$' % KEY)
FLAG_RE = re.compile(r"^[\[(]*(--[A-Za-z0-9][\w-]*)")
REGISTER_RE = re.compile(r'register_model\(\{\s*"([a-z][a-z0-9_]*)"')


class Page:
    """A markdown file split into prose (code blanked out), code spans and fenced blocks."""

    def __init__(self, path, relpath):
        self.path = path
        self.rel = relpath
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        self.blocks = []  # (first line number of the content, language, content)
        lines = self.text.split("\n")
        prose_lines = []
        fence = None
        for number, line in enumerate(lines, 1):
            stripped = line.lstrip()
            if fence is None:
                m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
                if m:
                    fence = (m.group(1), m.group(2).lower(), number + 1, [])
                    prose_lines.append("")
                    continue
                prose_lines.append(line)
            else:
                if stripped.startswith(fence[0]) and stripped.strip() == fence[0][0] * len(stripped.strip()):
                    self.blocks.append((fence[2], fence[1], "\n".join(fence[3])))
                    fence = None
                else:
                    fence[3].append(line)
                prose_lines.append("")
        prose = "\n".join(prose_lines)
        # Code spans: a run of backticks, then anything up to the same run, within a paragraph.
        self.spans = []  # (line, content)
        span_re = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
        for m in span_re.finditer(prose):
            self.spans.append((prose.count("\n", 0, m.start()) + 1, m.group(2).strip()))
        # Prose without code, same offsets, for the links.
        self.prose = span_re.sub(lambda m: " " * len(m.group(0)) if "\n" not in m.group(0)
                                 else re.sub(r"[^\n]", " ", m.group(0)), prose)

    def line_of(self, offset, text):
        return text.count("\n", 0, offset) + 1

    def code(self):
        """Every piece of code: (line, language or None for a span, text)."""
        for line, content in self.spans:
            yield line, None, content
        for line, lang, content in self.blocks:
            yield line, lang, content


def osa_distance(a, b):
    """Optimal string alignment distance, as src/config/schema.cpp's distance()."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def close(word, candidates):
    """src/config/schema.cpp's closest(): within max(1, len/3) edits, or a common prefix >= 3."""
    limit = max(1, len(word) // 3)
    for c in candidates:
        shorter = min(len(word), len(c))
        if osa_distance(word, c) <= limit or (shorter >= 3 and word[:shorter] == c[:shorter]):
            return True
    return False


class Config:
    """The config keys, from docs/config.md's tables."""

    def __init__(self, source):
        self.keys = set()
        with open(os.path.join(source, "docs", "config.md"), encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\|\s*`(%s)`\s*\|" % KEY, line)
                if m:
                    self.keys.add(m.group(1))
        if not self.keys:
            sys.exit("check_docs: no config keys found in docs/config.md's tables")
        self.sections = {k.split(".")[0] for k in self.keys}
        self.prefixes = {".".join(k.split(".")[:i]) for k in self.keys for i in range(1, k.count(".") + 1)}
        self.leaves = {k.rsplit(".", 1)[1] for k in self.keys}
        self.builtin_models = {k.split(".")[1] for k in self.keys if k.startswith("model.") and k.count(".") == 2}

    def children(self, prefix):
        head = prefix + "."
        return {k[len(head):].split(".")[0] for k in self.keys if k.startswith(head)}

    def problem(self, key, user_models, strict):
        """None if `key` is fine, else what is wrong. strict: the text is surely meant as a key
        (--set, <placeholder>); otherwise only text the did-you-mean rule takes for a key."""
        parts = key.split(".")
        if parts[0] not in self.sections:
            return None
        if key in self.keys or key in self.prefixes:
            return None
        if parts[0] == "model" and len(parts) >= 3 and parts[1] not in self.builtin_models:
            if parts[1] in user_models:
                return None
            return "config key %s: %r is neither a built-in model nor one registered by the examples or this page" % (
                key, parts[1])
        parent = ".".join(parts[:-1])
        if not strict and parent in self.prefixes:
            leaf = parts[-1]
            if leaf not in self.leaves and not close(leaf, self.children(parent)):
                return None  # a file name such as model.safetensors, not a key
        return "unknown config key %s" % key


class Programs:
    """mpitrain's programs: their names, and their flags from --help (run on demand)."""

    def __init__(self, source, bindir):
        self.source = source
        self.bindir = bindir
        self.names = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(source, "src", "apps", "*.cpp"))}
        self.names |= {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(source, "bench", "bench_*.cpp"))}
        # An example project's program is named after its folder; it is built by tests/package,
        # so its flags come from its sources' add_option/add_flag calls.
        self.examples = {}
        for folder in glob.glob(os.path.join(source, "examples", "*", "CMakeLists.txt")):
            name = os.path.basename(os.path.dirname(folder))
            text = ""
            for src in glob.glob(os.path.join(os.path.dirname(folder), "*.cpp")):
                with open(src, encoding="utf-8") as f:
                    text += f.read()
            self.examples[name] = set(re.findall(r'add_(?:option|flag)\(\s*"(--[\w-]+)', text)) | {"--help"}
        self.names |= set(self.examples)
        self.helps = {}

    def help_text(self, command):
        """--help output of (program, subcommand...) in the build's bin folder."""
        exe = os.path.join(self.bindir, command[0])
        try:
            out = subprocess.run([exe, *command[1:], "--help"], capture_output=True, text=True, timeout=60)
            return out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return "<%s>" % e

    def prefetch(self, commands):
        todo = sorted({c for c in commands if c not in self.helps and c[0] not in self.examples})
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for command, text in zip(todo, pool.map(self.help_text, todo)):
                self.helps[command] = text

    def subcommands(self, program):
        text = self.helps.get((program,)) or ""
        m = re.search(r"\n(?:Subcommands|SUBCOMMANDS):\n((?:  \S.*\n?)*)", text)
        return set(re.findall(r"^  (\S+)", m.group(1), re.M)) if m else set()

    def flags(self, command):
        if command[0] in self.examples:
            return self.examples[command[0]]
        flags = set()
        for i in range(1, len(command) + 1):
            flags |= set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", self.helps.get(command[:i], "")))
        return flags


def tokens(line):
    try:
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        return list(lexer)
    except ValueError:  # an unbalanced quote: words are good enough
        return line.split("#", 1)[0].split()


def commands(code, is_span):
    """The commands in a piece of shell code: (line offset, words), split at ;, &&, || and |."""
    lines = [code] if is_span else code.split("\n")
    joined = []  # (line offset, text)
    for offset, line in enumerate(lines):
        if joined and (joined[-1][1].endswith("\\") or re.match(r"\s+\[?--", line)):
            joined[-1] = (joined[-1][0], joined[-1][1].rstrip("\\") + " " + line.strip())
        else:
            joined.append((offset, line))
    for offset, line in joined:
        if line.lstrip().startswith("$ "):
            line = line.lstrip()[2:]
        current = []
        for word in tokens(line):
            if word in (";", "&&", "||", "|"):
                yield offset, current
                current = []
            elif word.endswith(";") and not word.endswith("\\;"):
                current.append(word[:-1])
                yield offset, current
                current = []
            else:
                current.append(word)
        yield offset, current


def program_of(words, programs, source):
    """(index of the program word, kind) with kind 'program' or 'script', or None."""
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_]\w*=", words[i]):
        i += 1
    if i == len(words):
        return None

    def kind(word):
        if os.path.basename(word) in programs.names:
            return "program"
        if re.match(r"^(?:\./)?(?:scripts|launch)/[\w./-]+$", word) and os.path.isfile(os.path.join(source, word.lstrip("./"))):
            return "script"
        return None

    if kind(words[i]):
        return i, kind(words[i])
    if os.path.basename(words[i]) in LAUNCHERS:
        for j in range(i + 1, len(words)):
            if kind(words[j]):
                return j, kind(words[j])
    return None


def check(source, bindir, files):
    config = Config(source)
    programs = Programs(source, bindir)
    example_models = set()
    for src in glob.glob(os.path.join(source, "examples", "**", "*.cpp"), recursive=True):
        with open(src, encoding="utf-8") as f:
            example_models |= set(REGISTER_RE.findall(f.read()))
    problems = []
    pages = [Page(os.path.join(source, f), f) for f in files]

    def models_of(page):
        """Model names a page may use: the examples' and those its own code registers."""
        return example_models | {m for _, _, code in page.code() for m in REGISTER_RE.findall(code)}

    # (c) first pass: the program invocations, so that the --help runs go in parallel.
    invocations = []  # (page, line, program command tuple, flags, kind, program word)
    for page in pages:
        for line, lang, code in page.code():
            if lang is not None and lang not in SHELL_LANGS:
                continue
            for offset, words in commands(code, lang is None):
                found = program_of(words, programs, source)
                if not found:
                    continue
                index, kind = found
                word = words[index]
                rest = words[index + 1:]
                command = (os.path.basename(word),)
                # After a lone "--" the words belong to another program (launch/mpirun.sh -- ...).
                own = rest[:rest.index("--")] if "--" in rest else rest
                flags = [m.group(1) for w in own for m in [FLAG_RE.match(w)] if m]
                invocations.append((page, line + offset, command, rest, flags, kind, word))
    programs.prefetch({inv[2] for inv in invocations if inv[5] == "program"})
    programs.prefetch({inv[2] + (inv[3][0],) for inv in invocations
                       if inv[5] == "program" and inv[3] and inv[3][0] in programs.subcommands(inv[2][0])})
    for page, line, command, rest, flags, kind, word in invocations:
        where = "%s:%d" % (page.rel, line)
        # (d) the keys of --set arguments.
        for i, w in enumerate(rest):
            value = rest[i + 1] if w == "--set" and i + 1 < len(rest) else w[6:] if w.startswith("--set=") else None
            m = re.match(r"^(%s)=" % KEY, value or "")
            if m:
                problem = config.problem(m.group(1), models_of(page), True)
                if problem:
                    problems.append("%s: %s" % (where, problem))
        if kind == "script":
            with open(os.path.join(source, word.lstrip("./")), encoding="utf-8") as f:
                text = f.read()
            for flag in flags:
                if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text):
                    problems.append("%s: %s is not an option of %s (not in its text)" % (where, flag, word))
            continue
        if command[0] not in programs.examples and not os.path.isfile(os.path.join(bindir, command[0])):
            problems.append("%s: program %s is not in the build (%s)" % (where, command[0], bindir))
            continue
        if rest and rest[0] in programs.subcommands(command[0]):
            command = command + (rest[0],)
        known = programs.flags(command)
        for flag in flags:
            if flag not in known:
                problems.append("%s: %s is not an option of %s (see %s --help)" % (
                    where, flag, " ".join(command), " ".join(command)))

    for page in pages:
        user_models = models_of(page)
        base = os.path.dirname(page.path)

        # (a) relative links.
        for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", page.prose, re.M):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not os.path.exists(os.path.join(base, path)):
                problems.append("%s:%d: link to %s: no such file" % (page.rel, page.line_of(m.start(), page.prose), target))

        for line, lang, code in page.code():
            where = "%s:%d" % (page.rel, line)
            # (b) paths in the source tree and programs in build/bin.
            def at(m):
                return "%s:%d" % (page.rel, line + code.count("\n", 0, m.start()))
            for m in PATH_RE.finditer(code):
                path = m.group(1).rstrip(".")
                if not glob.glob(os.path.join(source, path)):
                    problems.append("%s: %s does not exist in the source tree" % (at(m), path))
            for m in BIN_RE.finditer(code):
                if not os.path.isfile(os.path.join(bindir, m.group(1))):
                    problems.append("%s: build/bin/%s is not a program of the build" % (at(m), m.group(1)))
            # (d) config keys.
            keys = [(at(m), m.group(1), True) for m in PLACEHOLDER_RE.finditer(code)]
            if lang is None:
                m = SPAN_KEY_RE.match(code)
                if m:
                    keys.append((where, m.group(1), "=" in code))
                m = SET_SPAN_RE.match(code)
                if m:
                    keys.append((where, m.group(1), True))
            if lang == "json":
                keys += [(where, k, True) for k in json_config_keys(code, config)]
            for place, key, strict in keys:
                problem = config.problem(key, user_models, strict)
                if problem:
                    problems.append("%s: %s" % (place, problem))
    return problems


def json_config_keys(code, config):
    """The leaf keys of a JSON block that is a config (every top-level key a section)."""
    try:
        tree = json.loads(code)
    except ValueError:
        return []
    if not isinstance(tree, dict) or not tree or not set(tree) <= config.sections:
        return []
    keys = []

    def walk(node, path):
        for k, v in node.items():
            p = path + "." + k if path else k
            if isinstance(v, dict) and p not in config.keys:
                walk(v, p)
            else:
                keys.append(p)
    walk(tree, "")
    return keys


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="the source tree")
    parser.add_argument("--bin", required=True, help="the build's bin folder")
    parser.add_argument("files", nargs="*", help="pages relative to the source tree (default: all)")
    args = parser.parse_args()
    source = os.path.abspath(args.source)
    files = args.files or (["README.md"] + sorted(os.path.relpath(p, source) for p in glob.glob(os.path.join(source, "docs", "*.md")))
                           + sorted(os.path.relpath(p, source) for p in glob.glob(os.path.join(source, "examples", "*", "README.md"))))
    problems = check(source, os.path.abspath(args.bin), files)
    problems.sort(key=lambda p: (p.split(":")[0], int(p.split(":")[1]) if p.split(":")[1].isdigit() else 0))
    for p in problems:
        print(p)
    print("check_docs: %d page(s), %d problem(s)" % (len(files), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
