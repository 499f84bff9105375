//go:build tools

// Pins the commands build.sh compiles, so `go build k8s.io/kubernetes/cmd/...` resolves in this module.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
