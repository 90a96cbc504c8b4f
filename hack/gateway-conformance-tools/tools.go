//go:build tools

// Package tools pins the Gateway API conformance suite and its echo-basic backend, built by
// hack/build-go-tool.sh echo-basic and hack/gateway-conformance.sh.
package tools

import (
	_ "sigs.k8s.io/gateway-api/conformance/echo-basic"
	_ "sigs.k8s.io/gateway-api/conformance"
)
