"""Scenario 9: cold archives of a real repository, git/git at a pinned tag.

Given `--real-repo PATH` (or `GITBALL_BENCH_REAL_REPO=PATH`), a clone of
git/git (bare or not, with the tag v2.47.0), the bench makes its own bare
repository `git/git` under the work directory's `--repos` root with `git
clone --bare` of PATH: its object files are hard links to PATH's (copies on
another file system), never alternates (the archiver refuses objects
borrowed from outside `--repos`), and nothing is written into PATH. The
network is never used. On that clone it adds 1 + 6 × runs key tags
`gitball-bench-NN`: commits with v2.47.0's tree and v2.47.0 as parent, so
every request is a distinct, never-cached archive of the same files.

Then scenario 1's measurement runs on it (`scenario_cold` in bench.py, its
own stack with a fresh cache): tar.gz, zip and tar.zst, archiver direct and
through the proxy, total time and first byte, each against `git archive`
(`| zstd -3`) in the same run, with the same goals. The total-time rows
note the time of `git archive --format=tar` alone in the same run: the
floor under every format.

Last, once: gitball's zip of v2.47.0 is compared entry by entry with `git
archive --format=zip` of the same tag and prefix, on the fields
`tests/harness/archives.rs::zip_entries` compares (the comment, then per
entry: name, UTF-8 flag, DOS time, made-by system and version, version
needed, internal and external attributes, central extra fields, CRC, size
and a SHA-256 of the data read back). A difference is a row that misses
its goal; both zips are kept in the work directory as the reproducer.

Without a real repository the scenario is skipped and the report says so.
"""

import hashlib
import os
import shutil
import subprocess
import zipfile

import gen_repo

TAG = "v2.47.0"
OWNER, NAME = "git", "git"
TITLE = f"{OWNER}/{NAME}@{TAG}"
SCENARIO = "9. cold real repository"
KEY_PREFIX = "gitball-bench-"


def source_arg(args, env):
    """The real repository given (the option wins over the environment), as
    an absolute path, or None; checked before any scenario runs."""
    source = args.real_repo or os.environ.get("GITBALL_BENCH_REAL_REPO") or None
    if source is None:
        return None
    source = os.path.abspath(source)
    check = subprocess.run(["git", "-C", source, "rev-parse", "--verify", "-q", f"refs/tags/{TAG}^{{commit}}"],
                           capture_output=True, text=True, env=env)
    if check.returncode != 0:
        raise SystemExit(f"--real-repo {source}: not a git repository with the tag {TAG}"
                         f" (the bench pins git/git at {TAG})")
    return source


def not_given(ctx):
    ctx.inputs["real repository"] = {
        "text": f"not given (`--real-repo PATH` or `GITBALL_BENCH_REAL_REPO`: a clone of git/git, measured at {TAG})"
    }
    print("  real repository: not given; scenario 9 skipped", flush=True)


def prepare(ctx, source, b, keys):
    """The bench's own bare clone of `source` with the key tags; returns
    its path. Records the input (commit, tree, files) for the report."""
    env = b.clean_env(ctx.home)
    path = ctx.repo_path(OWNER, NAME)
    shutil.rmtree(path, ignore_errors=True)  # a reused --workdir
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A local clone hard-links the object files (or copies them); no
    # --shared: alternates outside --repos are refused by the archiver.
    subprocess.run(["git", "clone", "-q", "--bare", source, path], check=True, env=env)
    subprocess.run(["git", "-C", path, "remote", "remove", "origin"], check=True, env=env)
    subprocess.run(["git", "-C", path, "config", "gc.auto", "0"], check=True, env=env)
    commit = gen_repo._git(path, "rev-parse", f"refs/tags/{TAG}^{{commit}}", env=env)
    _, tree = gen_repo.add_key_commits(path, len(keys), tag_prefix=KEY_PREFIX, env=env, base=f"refs/tags/{TAG}")
    listing = subprocess.run(["git", "-C", path, "ls-tree", "-r", "-l", tree], check=True, capture_output=True,
                             text=True, env=env).stdout.splitlines()
    blobs = [int(line.split()[3]) for line in listing if line.split()[1] == "blob"]
    ctx.inputs[TITLE] = {"source": source, "commit": commit, "tree": tree, "files": len(blobs),
                         "blob_bytes": sum(blobs)}
    print(f"  {TITLE}: commit {commit}, tree {tree}, {len(blobs)} files, {sum(blobs) / b.MiB:.1f} MiB", flush=True)
    return path


def zip_entries(path):
    """Every entry of the zip at `path` as one line (the fields
    tests/harness/archives.rs::zip_entries prints), the comment first."""
    lines = []
    with zipfile.ZipFile(path) as z:
        lines.append("comment " + z.comment.decode())
        for i in z.infolist():
            data = z.read(i)  # checks the CRC
            lines.append(" ".join(str(x) for x in (
                repr(i.filename), i.flag_bits & 0x800, i.date_time, i.create_system, i.create_version,
                i.extract_version, i.internal_attr, oct(i.external_attr), i.extra.hex(), i.CRC, i.file_size,
                hashlib.sha256(data).hexdigest())))
    return lines


def check_zip(ctx, stack, results, b, repo_dir):
    """gitball's zip of TAG against git's, entry by entry."""
    env = b.clean_env(ctx.home)
    out = os.path.join(stack.dir, "zip-check")
    os.makedirs(out, exist_ok=True)
    ours, theirs, head = (os.path.join(out, n) for n in ("gitball.zip", "git.zip", "gitball.headers"))
    url = f"http://127.0.0.1:{stack.archiver_port}/{OWNER}/{NAME}/archive/{TAG}.zip"
    subprocess.run(["curl", "-sf", "--max-time", "300", "-o", ours, "-D", head, url], check=True)
    with open(head) as f:
        disposition = next(line for line in f if line.lower().startswith("content-disposition:"))
    prefix = disposition.split('filename="', 1)[1].split('"', 1)[0].removesuffix(".zip")
    argv = ["git", "-C", repo_dir, "archive", "--format=zip", f"--prefix={prefix}/", TAG]
    with open(theirs, "wb") as f:
        subprocess.run(argv, check=True, stdout=f, env=env)
    a, e = zip_entries(ours), zip_entries(theirs)
    differing = [(i, x, y) for i, (x, y) in enumerate(zip(a, e)) if x != y]
    count = len(differing) + abs(len(a) - len(e))
    what = f"zip of {TITLE}: entries differing from git archive --format=zip"
    note = (f"{len(e) - 1} entries of git's zip and its comment, compared on name, UTF-8 flag, DOS time, made-by,"
            f" version needed, internal and external attributes, extra fields, CRC, size, SHA-256 of the data")
    if count:
        first = differing[0] if differing else (min(len(a), len(e)), "(none)", "(none)")
        note += (f"; gitball has {len(a) - 1} entries; first difference at line {first[0]}: gitball {first[1]!r}"
                 f" vs git {first[2]!r}; reproducer: {' '.join(argv)} vs GET {url} (both kept in {out})")
        for i, x, y in differing[:10]:
            print(f"    line {i}:\n      gitball {x}\n      git     {y}", flush=True)
    else:
        for name in (ours, theirs):
            os.remove(name)
    print(f"    zip check: {count} differing of {len(e)} lines ({len(e) - 1} entries + comment), prefix {prefix}/", flush=True)
    results.add(SCENARIO, what, "entries", b.summary([count]), None, None, ("abs<", 1), "lower", note)


def run(ctx, results, b, source):
    """`b` is the bench module (its helpers and scenario_cold)."""
    keys = [f"{KEY_PREFIX}{i:02d}" for i in range(3 * 2 * ctx.s.runs + 1)]
    repo_dir = prepare(ctx, source, b, keys)
    with b.Stack(ctx, "realrepo") as stack:
        first = len(results.rows)
        # Its rows carry git's tar alone, the floor under every format.
        b.scenario_cold(ctx, stack, results, OWNER, NAME, keys, ("tar.gz", "zip", "tar.zst"), TITLE)
        for row in results.rows[first:]:
            row["scenario"] = SCENARIO
        check_zip(ctx, stack, results, b, repo_dir)
