// Package mlog implements the part of monis.app/mlog's API that the workload identity
// webhook and token proxy use (levels, JSON format, a logr sink), writing JSON lines to stderr.
package mlog

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// LogLevel names a verbosity; the empty level logs warnings and errors only.
type LogLevel string

// LogFormat names an output format; only JSON is produced.
type LogFormat string

const (
	LevelWarning LogLevel = ""
	LevelInfo    LogLevel = "info"
	LevelDebug   LogLevel = "debug"
	LevelTrace   LogLevel = "trace"
	LevelAll     LogLevel = "all"

	FormatDefault LogFormat = ""
	FormatJSON    LogFormat = "json"
	FormatText    LogFormat = "text"
)

// LogSpec is the level and format set by ValidateAndSetLogLevelAndFormatGlobally.
type LogSpec struct {
	Level  LogLevel  `json:"level,omitempty"`
	Format LogFormat `json:"format,omitempty"`
}

var verbosity atomic.Int32

func levelVerbosity(l LogLevel) (int32, error) {
	switch l {
	case LevelWarning:
		return 0, nil
	case LevelInfo:
		return 2, nil
	case LevelDebug:
		return 4, nil
	case LevelTrace:
		return 6, nil
	case LevelAll:
		return 108, nil
	}
	return 0, fmt.Errorf("invalid log level: %q", l)
}

// ValidateAndSetLogLevelAndFormatGlobally sets the process-wide level.
func ValidateAndSetLogLevelAndFormatGlobally(_ context.Context, spec LogSpec) error {
	v, err := levelVerbosity(spec.Level)
	if err != nil {
		return err
	}
	switch spec.Format {
	case FormatDefault, FormatJSON, FormatText:
	default:
		return fmt.Errorf("invalid log format: %q", spec.Format)
	}
	verbosity.Store(v)
	return nil
}

// Enabled reports whether messages at level l are written.
func Enabled(l LogLevel) bool {
	v, err := levelVerbosity(l)
	return err == nil && v <= verbosity.Load()
}

// Setup returns the function that flushes logs at exit (nothing is buffered here).
func Setup() func() { return func() {} }

var sink = funcr.NewJSON(func(obj string) { fmt.Fprintln(os.Stderr, obj) }, funcr.Options{
	LogTimestamp: true,
	Verbosity:    108,
})

func root() logr.Logger {
	return sink.V(0)
}

// Logr returns the logr.Logger behind this package, honoring the global level.
func Logr() logr.Logger { return logr.New(&levelSink{inner: sink.GetSink()}) }

type levelSink struct{ inner logr.LogSink }

func (s *levelSink) Init(info logr.RuntimeInfo) { s.inner.Init(info) }
func (s *levelSink) Enabled(level int) bool     { return int32(level) <= verbosity.Load() }
func (s *levelSink) Info(level int, msg string, kv ...any) {
	s.inner.Info(level, msg, kv...)
}
func (s *levelSink) Error(err error, msg string, kv ...any) { s.inner.Error(err, msg, kv...) }
func (s *levelSink) WithValues(kv ...any) logr.LogSink {
	return &levelSink{inner: s.inner.WithValues(kv...)}
}
func (s *levelSink) WithName(name string) logr.LogSink {
	return &levelSink{inner: s.inner.WithName(name)}
}

// Logger is the structured logger returned by New.
type Logger struct{ l logr.Logger }

// New returns a logger writing at the global level.
func New() Logger { _ = root(); return Logger{l: Logr()} }

func (l Logger) WithName(name string) Logger            { return Logger{l: l.l.WithName(name)} }
func (l Logger) WithValues(kv ...any) Logger            { return Logger{l: l.l.WithValues(kv...)} }
func (l Logger) Error(msg string, err error, kv ...any) { l.l.Error(err, msg, kv...) }
func (l Logger) Warning(msg string, kv ...any)          { l.l.V(0).Info(msg, kv...) }
func (l Logger) Info(msg string, kv ...any)             { l.l.V(2).Info(msg, kv...) }
func (l Logger) Debug(msg string, kv ...any)            { l.l.V(4).Info(msg, kv...) }
func (l Logger) Trace(msg string, kv ...any)            { l.l.V(6).Info(msg, kv...) }
func (l Logger) All(msg string, kv ...any)              { l.l.V(108).Info(msg, kv...) }

// Fatal logs err and exits with status 1.
func Fatal(err error, kv ...any) {
	Logr().Error(err, "fatal error", kv...)
	os.Exit(1)
}

// Info logs msg at the info level.
func Info(msg string, kv ...any) { Logr().V(2).Info(msg, kv...) }
