"""Deterministic synthetic repositories for the benchmarks.

Everything here is a pure function of its arguments and a seeded
`random.Random`: two machines that run the same Python (3.9+) generate the
same files, the same commits and so the same tree ids (the benchmark
prints them, so figures from different machines can be checked to come
from the same input).

Repositories are written with `git fast-import` (no work tree, one pass):

- `source_like`: thousands of files of source-code-like text (indentation,
  identifiers from a fixed vocabulary, Zipf-distributed lines, a licence
  header per file), so it compresses roughly like real code (gzip about
  4x). One commit on `main`, plus `tags` extra commits `b00`, `b01`, …
  that point at the same tree with a different message: each is a
  distinct archive (a distinct cache key) with identical content, which
  is how the cold-archive runs get a fresh key per run.
- `incompressible`: files of seeded random bytes, stored uncompressed in
  the pack (`core.compression 0`) so that generating and archiving it is
  quick; its tar is the "1 GiB-class" cached stream.
"""

import os
import random
import subprocess

FIXED_DATE = "1700000000 +0000"
AUTHOR = "Gitball Bench <bench@example.invalid>"

_SYLLABLES = (
    "ar be ca de el fo ga hi in jo ka lo ma ne or pa qu re si ta un ve wi xo ya ze "
    "buf cnt ctx err idx len ptr req res src dst tmp val key map set get put add "
    "run log io net fs db http tls sock file path node tree hash lock sync async"
).split()

_KEYWORDS_BY_EXT = {
    ".rs": ("fn", "let", "mut", "pub", "impl", "match", "struct", "enum", "return", "use"),
    ".c": ("int", "char", "static", "const", "struct", "return", "if", "for", "while", "void"),
    ".py": ("def", "class", "return", "import", "from", "if", "for", "while", "with", "yield"),
    ".go": ("func", "var", "type", "struct", "return", "if", "for", "range", "go", "defer"),
    ".js": ("function", "const", "let", "return", "if", "for", "class", "async", "await", "new"),
}

_TEMPLATES = (
    "{kw} {a}({b}, {c}) {{",
    "{kw} {a} = {b}.{c}({n});",
    "if ({a} == {b}) {{",
    "}} else {{",
    "}}",
    "",
    "return {a};",
    "{a}.{b} = {c}.{a} + {n};",
    "// {a} {b} the {c} before {a} {b}",
    "/* {a}: {b} {c} {a} */",
    "{kw} {a}: {b} = {n};",
    "for ({a} = 0; {a} < {b}; {a}++) {{",
    '{a}("{b} {c}: %d", {n});',
    "assert({a} != {b});",
    "{a} += {b}[{n}] * {c};",
    "#include <{a}/{b}.h>",
    "{kw} {a} {{",
    "    {a},",
    "{a}, {b}, {c},",
    "{kw} {a}<{b}>({c}: &{b}) -> {a} {{",
)

LICENSE_HEADER = (
    "// Copyright 2024 The Example Authors. All rights reserved.\n"
    "// Use of this source code is governed by a BSD-style license that can be\n"
    "// found in the LICENSE file. Generated for gitball's benchmarks.\n\n"
)


def _identifiers(rng, count):
    names = set()
    while len(names) < count:
        parts = [rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))]
        names.add("_".join(parts) if rng.random() < 0.6 else parts[0] + "".join(p.title() for p in parts[1:]))
    return sorted(names)


def _line_pool(rng, ext, identifiers, size):
    keywords = _KEYWORDS_BY_EXT[ext]
    lines = []
    for _ in range(size):
        template = rng.choice(_TEMPLATES)
        line = template.format(
            kw=rng.choice(keywords),
            a=rng.choice(identifiers),
            b=rng.choice(identifiers),
            c=rng.choice(identifiers),
            n=rng.randint(0, 4096),
        )
        lines.append("    " * rng.choice((0, 1, 1, 2, 2, 2, 3, 3, 4)) + line + "\n")
    return lines


def source_like_files(seed, total_bytes, mean_file_bytes=32 * 1024):
    """Yields (path, bytes) of source-like files, about total_bytes in all."""
    rng = random.Random(seed)
    identifiers = _identifiers(rng, 4000)
    pools = {}
    for ext in sorted(_KEYWORDS_BY_EXT):
        pool = _line_pool(rng, ext, identifiers, 40000)
        # Zipf-like popularity: some lines ("}", "") are everywhere.
        cumulative, acc = [], 0.0
        for rank in range(len(pool)):
            acc += 1.0 / (rank + 8)
            cumulative.append(acc)
        pools[ext] = (pool, cumulative)
    exts = sorted(_KEYWORDS_BY_EXT)
    modules = identifiers[:120]
    written = 0
    index = 0
    while written < total_bytes:
        ext = exts[index % len(exts)]
        pool, cumulative = pools[ext]
        size = int(min(max(rng.lognormvariate(0, 0.9) * mean_file_bytes * 0.67, 300), 512 * 1024))
        size = min(size, total_bytes - written) if total_bytes - written > 300 else size
        count = max(1, size // 34)
        body = LICENSE_HEADER + "".join(rng.choices(pool, cum_weights=cumulative, k=count))
        data = body.encode()
        module = modules[index % len(modules)]
        sub = modules[(index // len(modules)) % 17]
        path = f"src/{module}/{sub}/{identifiers[(index * 7919) % len(identifiers)]}_{index}{ext}"
        yield path, data
        written += len(data)
        index += 1


def incompressible_files(seed, total_bytes, file_bytes=16 * 1024 * 1024):
    rng = random.Random(seed)
    index = 0
    written = 0
    while written < total_bytes:
        size = min(file_bytes, total_bytes - written)
        yield f"blobs/blob-{index:04d}.bin", rng.randbytes(size)
        written += size
        index += 1


def _git(repo, *args, env=None):
    return subprocess.run(
        ["git", "-C", repo, *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def write_repository(repo, files, tags=0, tag_prefix="b", extra_tags=(), compression=None, env=None):
    """Creates a bare repository at `repo` holding `files` in one commit on
    main, `tags` extra same-tree commits as lightweight tags, and
    `extra_tags` lightweight tags on the main commit. Returns
    (commit, tree, file_count, byte_count)."""
    os.makedirs(repo, exist_ok=True)
    subprocess.run(["git", "init", "-q", "--bare", repo], check=True, env=env)
    if compression is not None:
        _git(repo, "config", "core.compression", str(compression), env=env)
        _git(repo, "config", "pack.compression", str(compression), env=env)
    _git(repo, "symbolic-ref", "HEAD", "refs/heads/main", env=env)
    importer = subprocess.Popen(
        # Blobs over core.bigFileThreshold are streamed straight into the
        # pack: no delta search against the previous blob, which would cost
        # several times the rest of the import and save nothing here.
        ["git", "-C", repo, "-c", "core.bigFileThreshold=1k", "fast-import", "--quiet", "--done"],
        stdin=subprocess.PIPE,
        env=env,
    )
    out = importer.stdin
    message = b"gitball benchmark input\n"
    out.write(
        b"commit refs/heads/main\nmark :1\n"
        + f"author {AUTHOR} {FIXED_DATE}\ncommitter {AUTHOR} {FIXED_DATE}\n".encode()
        + f"data {len(message)}\n".encode()
        + message
    )
    count = 0
    total = 0
    for path, data in files:
        out.write(f"M 100644 inline {path}\ndata {len(data)}\n".encode())
        out.write(data)
        out.write(b"\n")
        count += 1
        total += len(data)
    out.write(b"\n")
    for index in range(tags):
        message = f"benchmark key {index}\n".encode()
        out.write(
            f"commit refs/tags/{tag_prefix}{index:02d}\nmark :{index + 2}\n".encode()
            + f"committer {AUTHOR} {FIXED_DATE}\n".encode()
            + f"data {len(message)}\n".encode()
            + message
            + b"from :1\n\n"
        )
    for tag in extra_tags:
        out.write(f"reset refs/tags/{tag}\nfrom :1\n\n".encode())
    out.write(b"done\n")
    out.close()
    if importer.wait() != 0:
        raise RuntimeError(f"git fast-import failed for {repo}")
    commit = _git(repo, "rev-parse", "refs/heads/main", env=env)
    tree = _git(repo, "rev-parse", "refs/heads/main^{tree}", env=env)
    return commit, tree, count, total


def add_key_commits(repo, tags, tag_prefix="b", env=None, base="HEAD"):
    """For a real repository: `tags` commits with `base`'s tree and `base`
    as parent, as lightweight tags b00, b01, …: distinct archives, same files."""
    head = _git(repo, "rev-parse", f"{base}^{{commit}}", env=env)
    tree = _git(repo, "rev-parse", f"{base}^{{tree}}", env=env)
    commit_env = dict(env or os.environ)
    commit_env.update(
        GIT_AUTHOR_NAME="Gitball Bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_AUTHOR_DATE=FIXED_DATE,
        GIT_COMMITTER_NAME="Gitball Bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
        GIT_COMMITTER_DATE=FIXED_DATE,
    )
    for index in range(tags):
        commit = _git(repo, "commit-tree", tree, "-p", head, "-m", f"benchmark key {index}", env=commit_env)
        _git(repo, "update-ref", f"refs/tags/{tag_prefix}{index:02d}", commit, env=env)
    return head, tree
