"""Guardrails: plain validators over resource types and properties (`policies.rules`), run three ways.

- `pulumi preview --policy-pack policies`: `policies/__main__.py` wraps every rule in a pulumi_policy Policy.
- `infra plan STACK`: `policies.engine.evaluate` runs the same rules over the offline plan's resources.
- the tests: through `ResourceValidationArgs` / `StackValidationArgs`, like the engine would.

Importing this package never constructs a `PolicyPack` (that starts a gRPC server and blocks).
"""
