"""chanseg on Ray Serve (the ``ray`` extra): each replica is a whole chanseg app.

    serve run service.ray_serve:build max_batch_size=8        # one machine, or
    serve deploy deploy/ray/serve.yaml                        # a running cluster

Each replica runs :func:`service.app.create_app` behind Serve's FastAPI ingress:
its own model, dynamic batcher, memory budget, limits, probes and metrics, so the
HTTP contract through Ray is the one ``python -m service`` serves. The batcher
is chanseg's own: ``benchmarks/ray_serve.py`` measures it against
``@serve.batch`` around the same forward pass (docs/deploy.md, "Ray Serve"), and the two
are never stacked.

How Ray's parts map onto chanseg's:

- **Shutdown.** Ray stops routing to a replica, waits for its ongoing requests
  (``graceful_shutdown_timeout_s``, set from ``DRAIN_TIMEOUT_S``), then runs the
  app's lifespan shutdown: chanseg's drain, which finishes anything still
  queued within what is left of the budget.
- **Health.** ``check_health`` fails when ``/healthz`` would (a batch stuck past
  ``WATCHDOG_S``, a lost device), so Ray replaces the replica; a lost device no
  longer stops the process (Ray does that).
- **Resources.** ``num_cpus`` per replica (torch's threads follow it unless
  ``num_threads`` is given) and ``num_gpus`` (1 when ``device`` is ``cuda``);
  ``placement`` as Ray's ``max_replicas_per_node``.
- **Scaling.** Autoscaling on ongoing requests per replica, the target one
  full batch per replica in flight and one forming (``2 x max_batch_size``).

Builder arguments are chanseg's settings by their lower-case names
(``max_batch_size=8``, ``model_path=...``; the ``CHANSEG_*`` environment of the
replica applies as usual) plus Serve's ``num_cpus``, ``num_gpus``,
``max_replicas_per_node``, ``runtime_env`` (the replicas') and the autoscaling fields ``min_replicas``,
``max_replicas``, ``target_ongoing_requests``, ``upscale_delay_s``,
``downscale_delay_s``, ``look_back_period_s``. Every response carries
``X-Ray-Replica`` and ``X-Ray-Node`` (which replica on which node answered).
``/metrics`` answers for the replica that serves the scrape: scrape each replica
through Ray's own metrics, or run ``python -m service`` per pod where per-replica
series matter.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig

from .app import create_app
from .settings import Settings

__all__ = ["ChansegReplica", "build", "deployment_options", "split_args"]

# Builder arguments that are Serve's, not chanseg's settings.
AUTOSCALING_KEYS = (
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "look_back_period_s",
)
RAY_KEYS = ("num_cpus", "num_gpus", "max_replicas_per_node", "runtime_env", *AUTOSCALING_KEYS)
# MAX_BATCH_SIZE=auto is measured on the replica, after Serve's options are fixed: the
# ongoing-request targets then assume batches of 8 (auto chose 1 to 16 on CPUs here); set
# max_batch_size, or target_ongoing_requests, to match a measured choice.
AUTO_BATCH_ASSUMED = 8


class ReplicaHeaders:
    """ASGI middleware: ``X-Ray-Replica`` and ``X-Ray-Node`` on every response."""

    def __init__(self, app, replica: str, node: str) -> None:
        self.app = app
        self.headers = [(b"x-ray-replica", replica.encode()), (b"x-ray-node", node.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *self.headers])
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()
class ChansegReplica:
    """One chanseg app per replica (:func:`build` makes the deployment)."""

    async def __init__(self, settings: Dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.state = None

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings)
        self.state = app.state.chanseg
        self.state.exit_hook = lambda: None  # a lost device fails check_health; Ray replaces the replica
        context = serve.get_replica_context()
        app.add_middleware(
            ReplicaHeaders, replica=context.replica_id.unique_id, node=ray.get_runtime_context().get_node_id()
        )
        return app

    def check_health(self) -> None:
        unhealthy = self.state.unhealthy() if self.state is not None else None
        if unhealthy:
            raise RuntimeError(unhealthy[1])


def deployment_options(settings: Settings, ray_args: Dict[str, Any]) -> Dict[str, Any]:
    """Serve's options for one chanseg deployment: resources, autoscaling, shutdown budget."""
    num_cpus = float(ray_args.get("num_cpus", 1))
    num_gpus = float(ray_args.get("num_gpus", 1 if settings.device.startswith("cuda") else 0))
    batch = settings.max_batch_size if isinstance(settings.max_batch_size, int) else AUTO_BATCH_ASSUMED
    options: Dict[str, Any] = dict(
        name="chanseg",
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Enough in flight to fill a batch while the last one runs; chanseg's own queue
        # (MAX_QUEUE) answers 503 beyond what it can finish within the deadline.
        max_ongoing_requests=min(settings.max_queue, 4 * batch),
        autoscaling_config=AutoscalingConfig(
            **{"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2 * batch}
            | {key: ray_args[key] for key in AUTOSCALING_KEYS if key in ray_args}
        ),
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
        health_check_timeout_s=30,
    )
    if "max_replicas_per_node" in ray_args:
        options["max_replicas_per_node"] = int(ray_args["max_replicas_per_node"])
    if "runtime_env" in ray_args:  # e.g. {"env_vars": {"LD_PRELOAD": tcmalloc}} for the replicas
        options["ray_actor_options"]["runtime_env"] = ray_args["runtime_env"]
    return options


def split_args(args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Builder arguments -> (chanseg's settings, Serve's fields)."""
    settings = {k: v for k, v in args.items() if k not in RAY_KEYS}
    return settings, {k: v for k, v in args.items() if k in RAY_KEYS}


def build(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """The Serve application (``serve run service.ray_serve:build key=value ...``)."""
    args, ray_args = split_args(args or {})
    if "num_threads" not in args:
        args["num_threads"] = max(1, int(float(ray_args.get("num_cpus", 1))))
    settings = Settings(**args)  # checked here, on the driver: a bad value fails the deploy, not each replica
    options = deployment_options(settings, ray_args)
    return serve.deployment(ChansegReplica).options(**options).bind(args)
