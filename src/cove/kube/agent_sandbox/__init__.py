"""kubernetes-sigs/agent-sandbox's API on cove (docs/agent-sandbox.md).

The kinds (CRDs in deploy/crds/, the source of truth; `crds`): `agents.x-k8s.io/v1beta1` Sandbox,
`extensions.agents.x-k8s.io/v1beta1` SandboxTemplate, SandboxClaim and SandboxWarmPool with upstream's field
names, and cove's own `cove.dev/v1alpha1` SandboxSnapshot and SandboxFork.

- `controller`: reconciles them under a Lease (`leader`), from watch caches (`informer`); a Sandbox is one
  Pod that cove's kubelet (cove.kube.kubelet) runs as a cove sandbox; what Pods cannot say (hibernate with
  memory, snapshots, forks, egress policy from `network`) goes to cove's REST API (`cove_api`);
- `router`: sandbox-router's protocol (X-Sandbox-ID / -Namespace / -Port) in front of cove: the runtime
  API upstream's client speaks, translated to cove's exec and files calls, and any other port proxied;
- `python -m cove.kube.agent_sandbox controller|router|install-crds` runs them (`__main__`).

Neither imports the control plane's internals: they are clients of cove's API and of the API server, and
run as their own processes (a Deployment each).
"""
