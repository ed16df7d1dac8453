// A stand-in for monis.app/mlog, the webhook's logging library: the module host monis.app
// is not reachable through the module proxy here ("Go module host not permitted"), so the
// webhook module replaces it with this small logr-based implementation of the part of its
// API the webhook calls. Only logging differs; the webhook's own code is built unchanged.
module monis.app/mlog

go 1.26.0

require github.com/go-logr/logr v1.4.3
