#!/usr/bin/env python3
"""Check that the systemd units, the tmpfs mount and the env files agree.

`systemd-analyze verify` checks each unit's syntax; this checks what it cannot
see: the relations between the files an operator copies together.

- both services run as the same user with the required hardening,
  `LimitNOFILE=65536`, `Restart=on-failure`, `KillSignal=SIGTERM`;
- `TimeoutStopSec=` exceeds the longest exit after SIGTERM the service
  can take, so systemd never SIGKILLs a drain in progress: the
  `GITBALL_SHUTDOWN_GRACE`, plus for a service that generates (the
  archiver, or a proxy with `GITBALL_REPOS`: embedded mode) the 5 s its
  generations get to stop, and in embedded mode the in-process archiver's
  grace of 2 s, which starts when the proxy's drain ends
  (docs/archiver.md, "Shutdown drain"; docs/proxy.md, "Signals");
- the archiver's only writable path is the cache: `ReadWritePaths=`,
  `GITBALL_CACHE_DIR` and the mount's `Where=` are the same directory, and
  the proxy has no writable path at all;
- the tmpfs is mode 0700, owned by the service user, and its `size=` is at
  least 1.2 x `GITBALL_CACHE_MAX_BYTES` (headroom for evicted files that
  readers still hold), and `GITBALL_MAX_ARCHIVE_BYTES` fits in the cache;
- each env file sets only variables its binary reads: the docs/archiver.md and docs/proxy.md flag
  list, or, given `--archiver-help`/`--proxy-help` (the binaries' `--help`
  output), the `[env: GITBALL_…]` names the binaries actually declare.

Usage: check-units.py [--archiver-help FILE] [--proxy-help FILE] [SYSTEMD_DIR]
Exit status 1 and one line per problem when anything disagrees.
"""

import argparse
import ipaddress
import pathlib
import re
import sys

# Flags of docs/archiver.md and docs/proxy.md, as GITBALL_* variables. The
# proxy also accepts the archiver's flags (embedded mode).
ARCHIVER_VARIABLES = {
    "GITBALL_LISTEN", "GITBALL_REPOS", "GITBALL_CACHE_DIR",
    "GITBALL_CACHE_MAX_BYTES", "GITBALL_MAX_GENERATIONS",
    "GITBALL_QUEUE_TIMEOUT", "GITBALL_GENERATION_TIMEOUT",
    "GITBALL_MAX_ARCHIVE_BYTES", "GITBALL_TOKEN_FILE", "GITBALL_GZIP_LEVEL",
    "GITBALL_ZSTD_LEVEL", "GITBALL_SHUTDOWN_GRACE", "GITBALL_LOG_FORMAT",
    "GITBALL_GIT", "GITBALL_GENERATION_MEMORY_LIMIT", "GITBALL_REQUIRE_REACHABLE",
    "GITBALL_ADMIN_LISTEN",
}
PROXY_VARIABLES = ARCHIVER_VARIABLES | {
    "GITBALL_ROUTES", "GITBALL_UPSTREAM_TOKEN_FILE",
    "GITBALL_SIGNING_KEY_FILE", "GITBALL_MAX_TOKEN_TTL", "GITBALL_CONNECT_TIMEOUT",
    "GITBALL_HEADER_TIMEOUT", "GITBALL_CLIENT_IDLE_TIMEOUT",
    "GITBALL_EJECT_FOR", "GITBALL_TRUSTED_PROXIES",
}

# Directive -> required value, for both services.
REQUIRED_SERVICE_SETTINGS = {
    "User": "gitball",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "LimitNOFILE": "65536",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
}

# The minimum tmpfs size as a multiple of GITBALL_CACHE_MAX_BYTES.
MIN_TMPFS_HEADROOM_FACTOR = 1.2
# After the grace: how long generations get to stop (GENERATION_STOP_DEADLINE
# in archiver/src/lib.rs), and an embedded archiver's grace, which starts when
# its proxy's drain ends (EMBEDDED_GRACE_MARGIN in proxy/src/lib.rs).
GENERATION_STOP_SECONDS = 5
EMBEDDED_GRACE_MARGIN_SECONDS = 2

SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(text):
    """Bytes of a gitball size (`4GiB`) or a tmpfs size (`5G`, `512m`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_seconds(text):
    """Seconds of a systemd time span (`45s`, `1min 30s`, `90`)."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"not a time span: {text!r}")
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown time unit in {text!r}")
        total += float(number) * units[unit]
    return total


def read_unit(path):
    """{section: {key: [values…]}}; repeated keys keep every value."""
    sections = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_env(path, problems):
    """{NAME: value} of a systemd EnvironmentFile."""
    variables = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", stripped)
        if not match:
            problems.append(f"{path.name}:{number}: not NAME=value: {line!r}")
            continue
        name, value = match.groups()
        if name in variables:
            problems.append(f"{path.name}:{number}: {name} set twice")
        if value[:1] in ("'", '"'):
            problems.append(f"{path.name}:{number}: {name}: drop the quotes, "
                            "the value is taken literally")
        variables[name] = value
    return variables


def variables_from_help(path):
    """GITBALL_* names a binary declares in its `--help` ([env: NAME=…])."""
    return set(re.findall(r"\[env:\s*(GITBALL_[A-Z0-9_]+)", path.read_text()))


def last(unit, section, key):
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def check_service(name, unit, env, allowed, problems):
    for key, wanted in REQUIRED_SERVICE_SETTINGS.items():
        got = last(unit, "Service", key)
        if got != wanted:
            problems.append(f"{name}: {key}={got or '(unset)'}, want {wanted}")
    exec_start = last(unit, "Service", "ExecStart") or ""
    binary = f"/usr/local/bin/{name.removesuffix('.service')}"
    if exec_start.split()[:1] != [binary]:
        problems.append(f"{name}: ExecStart={exec_start!r}, want {binary}")
    if not unit.get("Service", {}).get("EnvironmentFile"):
        problems.append(f"{name}: no EnvironmentFile=")

    grace = env.get("GITBALL_SHUTDOWN_GRACE")
    stop = last(unit, "Service", "TimeoutStopSec")
    if grace is None or stop is None:
        problems.append(f"{name}: set both GITBALL_SHUTDOWN_GRACE and TimeoutStopSec=")
    else:
        archiver = name == "gitball-archiver.service"
        embedded = not archiver and bool(env.get("GITBALL_REPOS"))
        longest = float(grace)
        if archiver or embedded:
            longest += GENERATION_STOP_SECONDS
        if embedded:
            longest += EMBEDDED_GRACE_MARGIN_SECONDS
        if parse_seconds(stop) <= longest:
            problems.append(
                f"{name}: TimeoutStopSec={stop} must exceed {longest:g} s, the longest exit "
                f"after SIGTERM with GITBALL_SHUTDOWN_GRACE={grace}: systemd would kill the drain")

    for variable in sorted(set(env) - allowed):
        problems.append(f"{name}: env file sets {variable}, which the binary does not read")


def check_front_is_trusted(env, problems):
    """A proxy on loopback has nginx on its host in front, which names each
    client in X-Forwarded-For; the proxy believes that only from
    GITBALL_TRUSTED_PROXIES. Without 127.0.0.1 there every client is
    127.0.0.1 to the archivers' crawler budget and generation queue
    (docs/proxy.md, "Client address")."""
    listen = env.get("GITBALL_LISTEN", "127.0.0.1:8080")
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        on_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        on_loopback = host == "localhost"
    if not on_loopback:
        return
    trusted = []
    for item in env.get("GITBALL_TRUSTED_PROXIES", "").split(","):
        if item.strip():
            try:
                trusted.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                problems.append(f"gitball-proxy.env: GITBALL_TRUSTED_PROXIES: {item.strip()!r} "
                                "is not a CIDR range or an IP address")
    nginx = ipaddress.ip_address("127.0.0.1")
    if not any(net.version == 4 and nginx in net for net in trusted):
        problems.append(
            f"gitball-proxy.env: GITBALL_LISTEN={listen} has nginx on this host in front, but "
            "GITBALL_TRUSTED_PROXIES does not hold 127.0.0.1: its X-Forwarded-For is ignored "
            "and every client is 127.0.0.1 to the archivers' crawler budget")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("systemd_dir", nargs="?", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "systemd")
    parser.add_argument("--archiver-help", type=pathlib.Path,
                        help="output of `gitball-archiver --help`")
    parser.add_argument("--proxy-help", type=pathlib.Path,
                        help="output of `gitball-proxy --help`")
    args = parser.parse_args()
    directory = args.systemd_dir
    problems = []

    archiver = read_unit(directory / "gitball-archiver.service")
    proxy = read_unit(directory / "gitball-proxy.service")
    mount = read_unit(directory / "var-cache-gitball.mount")
    archiver_env = read_env(directory / "gitball-archiver.env", problems)
    proxy_env = read_env(directory / "gitball-proxy.env", problems)

    archiver_allowed = ARCHIVER_VARIABLES
    proxy_allowed = PROXY_VARIABLES
    if args.archiver_help:
        archiver_allowed = variables_from_help(args.archiver_help)
        if not archiver_allowed:
            problems.append(f"{args.archiver_help}: no [env: GITBALL_…] in the help text")
    if args.proxy_help:
        proxy_allowed = variables_from_help(args.proxy_help)
        if not proxy_allowed:
            problems.append(f"{args.proxy_help}: no [env: GITBALL_…] in the help text")

    check_service("gitball-archiver.service", archiver, archiver_env,
                  archiver_allowed, problems)
    check_service("gitball-proxy.service", proxy, proxy_env, proxy_allowed, problems)
    check_front_is_trusted(proxy_env, problems)

    # The cache: one directory, named identically in three files.
    where = last(mount, "Mount", "Where")
    cache_dir = archiver_env.get("GITBALL_CACHE_DIR")
    writable = archiver.get("Service", {}).get("ReadWritePaths", [])
    writable = [path for value in writable for path in value.split()]
    if writable != [where]:
        problems.append(f"gitball-archiver.service: ReadWritePaths={' '.join(writable)}, "
                        f"want only the cache mount {where}")
    if cache_dir != where:
        problems.append(f"GITBALL_CACHE_DIR={cache_dir} is not the tmpfs mount point {where}")
    requires_mounts = " ".join(archiver.get("Unit", {}).get("RequiresMountsFor", []))
    if where not in requires_mounts.split():
        problems.append(f"gitball-archiver.service: RequiresMountsFor= lacks {where}")
    if proxy.get("Service", {}).get("ReadWritePaths"):
        problems.append("gitball-proxy.service: the proxy needs no ReadWritePaths=")

    # The tmpfs: private to the service user and larger than the cache.
    if last(mount, "Mount", "Type") != "tmpfs":
        problems.append("var-cache-gitball.mount: Type= is not tmpfs")
    options = dict(option.partition("=")[::2]
                   for option in (last(mount, "Mount", "Options") or "").split(","))
    user = last(archiver, "Service", "User")
    if options.get("mode") != "0700":
        problems.append(f"var-cache-gitball.mount: mode={options.get('mode')}, want 0700")
    if options.get("uid") != user or options.get("gid") != last(archiver, "Service", "Group"):
        problems.append("var-cache-gitball.mount: uid=/gid= must be the service user and group")
    try:
        tmpfs_bytes = parse_size(options.get("size", ""))
        cache_max = parse_size(archiver_env.get("GITBALL_CACHE_MAX_BYTES", "1GiB"))
        archive_max = parse_size(archiver_env.get("GITBALL_MAX_ARCHIVE_BYTES", "4GiB"))
        if tmpfs_bytes < MIN_TMPFS_HEADROOM_FACTOR * cache_max:
            problems.append(
                f"var-cache-gitball.mount: size={options.get('size')} is under "
                f"{MIN_TMPFS_HEADROOM_FACTOR} x GITBALL_CACHE_MAX_BYTES "
                f"({archiver_env.get('GITBALL_CACHE_MAX_BYTES')}): no headroom for held files")
        if archive_max > cache_max:
            problems.append("GITBALL_MAX_ARCHIVE_BYTES exceeds GITBALL_CACHE_MAX_BYTES")
    except ValueError as error:
        problems.append(f"var-cache-gitball.mount / env: {error}")

    for problem in problems:
        print(f"check-units: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check-units: units, mount and env files agree "
          f"(tmpfs {options.get('size')} for a {archiver_env.get('GITBALL_CACHE_MAX_BYTES')} cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
