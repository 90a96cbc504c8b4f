//go:build tools

// Package tools pins the Kubernetes binaries built by hack/build-k8s-tools.sh.
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum tidy.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
