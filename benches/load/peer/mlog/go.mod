// A stand-in for monis.app/mlog (the module host monis.app is not reachable through the
// module proxy here): the part of its API the workload identity token proxy calls, the
// webhook's stand-in (scripts/real-cluster/webhook/mlog) plus the package-level Info.
module monis.app/mlog

go 1.26.0

require github.com/go-logr/logr v1.4.3
