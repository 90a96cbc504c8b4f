//go:build tools

// Package tools pins the Kubernetes binaries built by hack/build-k8s-tools.sh (kube-apiserver,
// kubectl) and hack/node-rig.sh (kube-controller-manager, kube-scheduler, kubelet, kube-proxy).
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum tidy.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
