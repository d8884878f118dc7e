package meshshm

/*
#include <stdlib.h>
#include <meshshm.h>
*/
import "C"

import (
	"context"
	"unsafe"
)

// Error is a libmeshshm failure; Code is the C error code (MESHSHM_ERR_*).
// Compare with errors.Is against the Err* values:
//
//	if errors.Is(err, meshshm.ErrConnect) { ... }
//
// A timeout also matches context.DeadlineExceeded.
type Error struct {
	Code    int
	Message string
}

func (e *Error) Error() string { return e.Message }

// Is matches another *Error with the same Code, and context.DeadlineExceeded
// for a timeout.
func (e *Error) Is(target error) bool {
	if t, ok := target.(*Error); ok {
		return t.Code == e.Code
	}
	return e.Code == codeTimeout && target == context.DeadlineExceeded
}

// StatusError: the service answered with a non-OK status (Status: 5 not
// found, 13 internal, ...). errors.Is(err, ErrStatus) matches it.
type StatusError struct {
	Status  uint32
	Message string
	Body    []byte
}

func (e *StatusError) Error() string { return e.Message }

// Is matches ErrStatus.
func (e *StatusError) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == codeStatus
}

const (
	codeInvalidArgument = int(C.MESHSHM_ERR_INVALID_ARGUMENT)
	codeConnect         = int(C.MESHSHM_ERR_CONNECT)
	codeRejected        = int(C.MESHSHM_ERR_REJECTED)
	codeProxyGone       = int(C.MESHSHM_ERR_PROXY_GONE)
	codeTimeout         = int(C.MESHSHM_ERR_TIMEOUT)
	codeStatus          = int(C.MESHSHM_ERR_STATUS)
	codeProtocol        = int(C.MESHSHM_ERR_PROTOCOL)
	codeClosed          = int(C.MESHSHM_ERR_CLOSED)
	codeInternal        = int(C.MESHSHM_ERR_INTERNAL)
	codeCancelled       = int(C.MESHSHM_ERR_CANCELLED)
)

// Sentinels for errors.Is.
var (
	ErrInvalidArgument = &Error{Code: codeInvalidArgument, Message: "invalid argument"}
	ErrConnect         = &Error{Code: codeConnect, Message: "cannot connect to the proxy"}
	ErrRejected        = &Error{Code: codeRejected, Message: "the proxy rejected the connection"}
	ErrProxyGone       = &Error{Code: codeProxyGone, Message: "the proxy is gone"}
	ErrTimeout         = &Error{Code: codeTimeout, Message: "timed out"}
	ErrStatus          = &Error{Code: codeStatus, Message: "the service answered with an error status"}
	ErrProtocol        = &Error{Code: codeProtocol, Message: "protocol error"}
	ErrClosed          = &Error{Code: codeClosed, Message: "closed"}
	ErrInternal        = &Error{Code: codeInternal, Message: "internal error in libmeshshm"}
)

// Status codes a service answers with.
const (
	StatusOK                = 0
	StatusCancelled         = 1
	StatusUnknown           = 2
	StatusInvalidArgument   = 3
	StatusDeadlineExceeded  = 4
	StatusNotFound          = 5
	StatusPermissionDenied  = 7
	StatusResourceExhausted = 8
	StatusInternal          = 13
	StatusUnavailable       = 14
)

// StatusName is a name for a status ("not found", ...).
func StatusName(status uint32) string { return C.GoString(C.meshshm_status_name(C.uint32_t(status))) }

// makeError builds the error of code rc (message from this thread's last
// error; callers lock the OS thread around the C call and this).
func makeError(rc C.int, msg string, status uint32, body []byte) error {
	code := int(rc)
	if code == codeStatus {
		return &StatusError{Status: status, Message: msg, Body: body}
	}
	if msg == "" {
		msg = C.GoString(C.meshshm_strerror(rc))
	}
	return &Error{Code: code, Message: msg}
}

// cError turns what a shim.h wrapper reported (rc, a malloc'd message,
// the status) into a Go error, freeing the message.
func cError(rc C.int, msg *C.char, status C.uint32_t) error {
	defer C.free(unsafe.Pointer(msg))
	return makeError(rc, C.GoString(msg), uint32(status), nil)
}
