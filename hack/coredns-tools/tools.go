//go:build tools

// Package tools pins CoreDNS, which the Gateway API conformance suite's base manifests run
// (registry.k8s.io/coredns/coredns:v1.12.2), built by hack/build-go-tool.sh coredns.
package tools

import (
	_ "github.com/coredns/coredns"
)
