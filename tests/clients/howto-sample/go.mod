// The AKS how-to's sample (azure-workload-identity v1.6.0, examples/custom-token-endpoint-msal-go,
// commit 04d01a2f), built unchanged: `go build <its package>` from this module, whose go.sum
// pins the sample's module hash and its dependencies.
module identity-binding-proxy/tests/clients/howto-sample

go 1.26.4

require github.com/Azure/azure-workload-identity/examples/custom-token-endpoint-msal-go v0.0.0-20260611195211-04d01a2fc7f5
