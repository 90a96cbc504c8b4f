//go:build tools

// Package tools pins the helm CLI built by hack/build-k8s-tools.sh.
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum tidy.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
