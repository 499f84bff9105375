//go:build tools

// Pins helm so `go build helm.sh/helm/v3/cmd/helm` resolves in this module.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
