//go:build tools

// Package tools pins h2spec (HTTP/2 conformance, R9), built by hack/build-go-tool.sh h2spec.
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum tidy.
package tools

import (
	_ "github.com/summerwind/h2spec/cmd/h2spec"
)
