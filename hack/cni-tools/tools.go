//go:build tools

// Package tools pins the CNI plugins the node rig (hack/node-rig.sh) gives its kubelet:
// bridge, host-local, loopback and portmap. It is never compiled (build tag "tools").
package tools

import (
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
	_ "github.com/containernetworking/plugins/plugins/meta/portmap"
)
