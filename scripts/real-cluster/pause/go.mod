// Builds the node's pause program (main.go), statically.
module identity-binding-proxy/real-cluster/pause

go 1.26.0
