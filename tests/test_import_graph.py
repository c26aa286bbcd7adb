"""The product packages' import graph: no cycles, and a small named surface between receiver and workers.

The graph is read statically with ``ast``: every ``import`` statement counts,
at module level and inside functions alike (an import moved into a function
to dodge a cycle is still that cycle). ``from a import b`` is an edge to the
submodule ``a.b`` when ``a/b.py`` (or ``a/b/__init__.py``) exists, else to
``a``. Only imports between product modules are kept. Modules loaded by name
at run time (``importlib.import_module`` on the sink registry's strings,
Celery's ``include``) are configuration, not import statements, and are not
edges here.
"""
import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("receiver", "workers", "bench")

# The workers modules the web process (receiver/) may import, each with why it is shared. Only direct
# imports are checked; what these import in turn is theirs to keep small. Anything else the receiver
# needs belongs in one of these, or in receiver/.
RECEIVER_ALLOWED = {
    # start-up (receiver/__init__.py)
    "workers.config": "Settings and ConfigError: one configuration for the web and worker processes",
    "workers.logs": "logging set-up with redaction: the web process logs as the workers do",
    "workers.pipeline.routes": "the routes file: every process refuses a bad one at start-up; the workers apply it",
    "workers.store.redis_health": "Redis reachability and memory checks, for start-up and /readyz as for `status`",
    # webhook intake and hand-off (webhooks.py, handoff.py, openapi.py)
    "workers.domain.events": "event types, key fields and schemas: what the receiver accepts and documents is what "
                      "the workers process",
    "workers.domain.json_text": "how deeply a delivery may nest: the receiver refuses what a worker could not carry",
    "workers.locate2u.webhook_auth": "the webhook URL token check, matching the URLs the subscriptions register",
    "workers.celery_config": "queue and task names, and the Celery app factory the hand-off sends with",
    "workers.store.redis_messages": "the Redis task message format, for the atomic ledger-and-queue hand-off",
    "workers.store.queue_positions": "queue tickets: a hand-off through another broker keeps its message's ticket, "
                                     "as the record script does on Redis",
    "workers.store.redis_client": "Redis connections with the relay's timeouts and TLS, as the workers open them",
    "workers.store.ledger": "the Ledger (and its final states): the receiver writes the ledger the workers read",
    "workers.store.quarantine": "the Quarantine: the receiver keeps invalid deliveries where the workers' CLI reads them",
    "workers.store.keys": "the Redis key and queue names, so the web process reads and writes what the workers do",
    # /metrics (metrics.py)
    "workers.metrics": "queue-depth and ledger metrics collected from Redis, served by the web process",
    "workers.sinks": "sink names and which are configured: metrics labels, console filters (it imports the sink "
                     "modules for their declarations; the webhook path never builds a sink)",
    # Locate2u OAuth callback (oauth.py, health.py)
    "workers.resilience.errors": "retriable / permanent errors raised by the Locate2u client and token exchange",
    "workers.locate2u.client": "the Locate2u client that exchanges the callback's code",
    "workers.locate2u.linking": "linking the authorising account (and refusing another one) as the CLI does",
    "workers.locate2u.oauth_links": "OAuth states, start links and PKCE of the code flow",
    # operator console (console/)
    "workers.runtime": "the Runtime (settings, Redis, sinks, task sending) the console's operations run in",
    "workers.ops.operations": "replay, release, discard and search: the console runs the CLI's operations",
    "workers.dyno.router": "the client behind Heroku's router, which the gunicorn hook passes on: the console's "
                           "login limit counts per client",
}
# Modules the web process must never load, even through the allowed ones: the command line and benchmarks.
RECEIVER_NEVER = ("workers.ops.cli", "workers.ops.commands", "workers.locate2u.commands",
                  "workers.locate2u.stops_command", "bench")

# Import edges that close a known cycle which this branch could not break without editing a module
# owned elsewhere. Each entry: (importer, imported) -> the cycle it closes. The graph without these
# edges must have no cycle, and every entry must still close a cycle (delete it once fixed). Format:
#     ("workers.a", "workers.b"): "workers.a -> workers.b -> workers.a: why it is not broken here",
KNOWN_CYCLES = {}


def product_modules():
    """``{module name: path}`` for every module of the product packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(tree, module, is_package):
    """``(module, name)`` for every import anywhere in ``tree``: ``import a.b`` gives ``("a.b", None)``,
    ``from a import b`` (or the relative form) gives ``("a", "b")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                yield source, alias.name


def import_graph():
    """``{module: {product modules it imports}}`` over the product packages."""
    modules = product_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = graph.setdefault(module, set())
        for source, name in imported_names(tree, module, path.name == "__init__.py"):
            if name and f"{source}.{name}" in modules:
                target = f"{source}.{name}"
            else:
                # ``import a.b.c`` of a product module, or the nearest product package it lies in.
                target = source
                while target and target not in modules:
                    target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
    return graph


def strongly_connected(graph):
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycle(graph, start, within):
    """A shortest path ``start -> ... -> start`` using only modules in ``within``."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ == start:
                    return paths[node] + [start]
                if succ in within and succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    following.append(succ)
        frontier = following
    return None


def describe_cycles(graph):
    """Each cycle's modules, and a shortest cycle through each of them (one line per distinct cycle)."""
    lines = []
    for component in strongly_connected(graph):
        members, cycles = set(component), set()
        for node in component:
            cycle = shortest_cycle(graph, node, members)[:-1]
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first]))
        lines.append(f"cycle among {', '.join(component)}:")
        lines.extend(f"    {' -> '.join(cycle + cycle[:1])}" for cycle in sorted(cycles, key=lambda c: (len(c), c)))
    return "\n".join(lines)


def without_known_cycles(graph):
    return {module: edges - {target for (importer, target) in KNOWN_CYCLES if importer == module}
            for module, edges in graph.items()}


def test_the_graph_sees_module_level_and_function_level_imports():
    graph = import_graph()
    assert "workers.config" in graph["receiver"]  # module level, ``from workers.config import ...``
    assert "workers.locate2u.stops_import" in graph["workers.locate2u.stops_command"]  # parenthesised ``from ... import``
    assert "workers.ops.simulators.base" in graph["workers.ops.simulators.b2b"]  # relative ``from .base import``
    assert "workers.ops.devstack" in graph["workers.ops.cli"]  # only imported inside functions


def test_cycles_are_found_and_reported_with_their_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert describe_cycles(graph) == "cycle among a, b, c:\n    a -> b -> c -> a"
    assert describe_cycles({**graph, "c": {"d"}}) == ""


def test_there_is_no_import_cycle():
    cycles = describe_cycles(without_known_cycles(import_graph()))
    assert not cycles, "import cycles (function-level imports count too):\n" + cycles


def test_every_known_cycle_is_still_there():
    """An entry of KNOWN_CYCLES whose import is gone or no longer closes a cycle must be removed."""
    graph = import_graph()
    for (importer, target), cycle in KNOWN_CYCLES.items():
        assert target in graph.get(importer, ()), (
            f"{importer} no longer imports {target}: remove it from KNOWN_CYCLES ({cycle})")
        assert shortest_cycle({**graph, importer: {target}}, importer, set(graph)), (
            f"{importer} -> {target} closes no cycle any more: remove it from KNOWN_CYCLES ({cycle})")


def test_the_receiver_imports_only_its_named_workers_modules():
    graph = import_graph()
    used = {(module, target) for module, edges in graph.items() if module.split(".")[0] == "receiver"
            for target in edges if target.split(".")[0] != "receiver"}
    outside = sorted(f"{module} imports {target}" for module, target in used if target not in RECEIVER_ALLOWED)
    assert not outside, ("the receiver may import only the workers modules named in RECEIVER_ALLOWED "
                         "(add one there with the reason it is shared, or move the code):\n" + "\n".join(outside))
    unused = set(RECEIVER_ALLOWED) - {target for _, target in used}
    assert not unused, f"RECEIVER_ALLOWED names modules the receiver no longer imports: {sorted(unused)}"


def test_the_receiver_never_loads_the_command_line():
    graph = import_graph()
    reached, path = {}, [module for module in graph if module.split(".")[0] == "receiver"]
    for module in path:
        reached[module] = [module]
    while path:
        module = path.pop()
        for target in graph[module]:
            if target not in reached:
                reached[target] = reached[module] + [target]
                path.append(target)
    loaded = [" -> ".join(chain) for module, chain in sorted(reached.items())
              if any(module == name or module.startswith(name + ".") for name in RECEIVER_NEVER)]
    assert not loaded, "the web process would load command-line modules:\n" + "\n".join(loaded)


def test_the_readmes_package_table_names_every_workers_package_and_nothing_else():
    """README "How it works" walks the packages in delivery order: a package added, renamed or
    removed without the table following fails here."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## How it works"):readme.index("## Routing and sinks")]
    named = set(re.findall(r"^\| `workers/(\w+)/` \|", section, re.M))
    packages = {path.parent.name for path in (REPO_ROOT / "workers").glob("*/__init__.py")}
    assert named == packages - {"dyno"}  # dyno (process settings) is named in the line under the table
    assert "`workers/dyno/`" in section
