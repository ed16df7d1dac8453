// A stand-in for monis.app/mlog, the workload identity project's logging library: the module
// host monis.app is not reachable through the module proxy here ("Go module host not
// permitted"), so the webhook module (and the load harness's build of the project's token
// proxy, benches/load/peer) replaces it with this small logr-based implementation of the part
// of its API they call. Only logging differs; the project's own code is built unchanged.
module monis.app/mlog

go 1.26.0

require github.com/go-logr/logr v1.4.3
