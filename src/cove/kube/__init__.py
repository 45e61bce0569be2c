"""cove as a Kubernetes node (docs/kubernetes.md): the server plays the kubelet's part for sandboxes,
in the way virtual-kubelet does, through the API server only (`cove.kube.kubelet.Kubelet`, started by the
control plane when `COVE_KUBECONFIG` is set).

What maps to what:

- a cove server (its node, `cove.fleet.id`) -> a `Node` of that name, with the host's CPUs and memory as
  capacity, the labels `type=virtual-kubelet`, `kubernetes.io/role=agent`, `cove.dev/node=true` (and
  `cove.dev/gvisor=true` where runsc works) and the taint `virtual-kubelet.io/provider=cove:NoSchedule`,
  so that only pods meant for cove land there;
- its liveness -> a `Lease` in `kube-node-lease`, renewed every 2 s, and the Node's `Ready` condition,
  every 10 s: the upstream node-lifecycle controller reads them and marks a silent node Unknown, taints it
  unreachable and evicts its pods. cove writes no failure detector of its own, and no scheduler:
  kube-scheduler places pods;
- cove's runtimes -> the RuntimeClasses `cove-namespaces` and `cove-gvisor` (handlers `namespaces`,
  `gvisor`). Their `scheduling` carries the node selector and the toleration of the taint, which the
  RuntimeClass admission plugin copies into every pod that names them: a pod opts in by naming one;
- a Pod bound to the node -> one sandbox: template from the annotation `cove.dev/template` (default
  `base`; the image is only reported, never pulled), env, cpu and memory limits, working directory and
  command (+ args, run as a long-lived process) from its single container; no timeout, as the pod's
  lifetime is Kubernetes'. Its metadata `k8s.namespace`, `k8s.pod`, `k8s.uid`, `k8s.node` tie it to the
  pod across restarts; the pod gets the annotation `cove.dev/sandbox` and a status (phase, IPs, conditions,
  container status with `containerID: cove://<sandbox id>`);
- the tenant of the sandbox -> the annotation `cove.dev/tenant` of the pod's **namespace**, else
  `default`. Not the pod's: whoever may create pods could then put sandboxes in any tenant, whereas
  namespaces are set up by the cluster's administrators. And not the namespace's name by default: the
  sandboxes then stay visible to the operator's own keys (tenant `default`) until a mapping is chosen;
- a Pod's end -> its sandbox's end, and the reverse. Deleting the pod kills the sandbox, then removes the
  pod (grace 0, the kubelet's job). A sandbox that ends by itself (killed through cove's API, an error, its
  node lost) makes the pod `Failed`: it did not complete its work, and a controller that owns the pod
  (ReplicaSet, Job) replaces a failed pod. `Succeeded` means one thing only: the pod's command exited 0
  (its sandbox is then ended, as a kubelet frees an exited container's resources); exiting non-zero is
  `Failed` with the exit code. Sandboxes are never restarted in place, whatever `restartPolicy` says.
"""
