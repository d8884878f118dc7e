package meshshm

/*
#include "shim.h"
*/
import "C"

import (
	"context"
	"errors"
	"sync"
	"time"
	"unsafe"
)

// Request is a request delivered to a Server.
type Request struct {
	ID       uint64
	Service  string
	Method   string
	Body     []byte
	Timeout  time.Duration // time left to answer at delivery; 0: no deadline
	Priority uint8         // PriorityLow (0), PriorityNormal (1), PriorityHigh (2+)
	Headers  []Header      // request headers, in order
}

// Header is the value of the first request header called name (case-sensitive).
func (r *Request) Header(name string) ([]byte, bool) {
	for _, h := range r.Headers {
		if h.Name == name {
			return h.Value, true
		}
	}
	return nil, false
}

// Server is registered with the proxy as the handler of one service. Next
// is for one goroutine at a time; Reply may be called from any goroutine.
type Server struct {
	mu      sync.RWMutex
	s       *C.meshshm_server
	closed  bool
	service string
}

// Bind connects to the proxy (socketPath "": the default) and registers as
// the handler of service.
func Bind(socketPath, service string) (*Server, error) {
	var path *C.char
	if socketPath != "" {
		path = cstr(socketPath)
	}
	var s *C.meshshm_server
	var msg *C.char
	var status C.uint32_t
	if rc := C.mshm_bind(path, cstr(service), &s, &msg, &status); rc < 0 {
		return nil, cError(rc, msg, status)
	}
	return &Server{s: s, service: service}, nil
}

// Service is the service this server answers for.
func (s *Server) Service() string { return s.service }

const slice = 200 * time.Millisecond

// Next waits for the next request until ctx is done (then it returns
// ctx.Err()). A proxy that goes away gives ErrProxyGone.
func (s *Server) Next(ctx context.Context) (*Request, error) {
	var req C.meshshm_request
	var hs C.meshshm_headers
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		wait := slice
		if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
			wait = time.Until(d)
			if wait < 0 {
				wait = 0
			}
		}
		s.mu.RLock()
		if s.closed {
			s.mu.RUnlock()
			return nil, &Error{Code: codeClosed, Message: "the server is closed"}
		}
		var msg *C.char
		var status C.uint32_t
		rc := C.mshm_next_headers(s.s, &req, &hs, C.int32_t(wait/time.Millisecond), &msg, &status)
		s.mu.RUnlock()
		if rc == C.MESHSHM_ERR_TIMEOUT {
			C.free(unsafe.Pointer(msg))
			continue
		}
		if rc < 0 {
			return nil, cError(rc, msg, status)
		}
		r := &Request{
			ID:       uint64(req.id),
			Service:  C.GoString(req.service),
			Method:   C.GoString(req.method),
			Body:     C.GoBytes(unsafe.Pointer(req.body.data), C.int(req.body.len)),
			Timeout:  time.Duration(req.timeout_ms) * time.Millisecond,
			Priority: uint8(req.priority),
		}
		if hs.len > 0 {
			items := unsafe.Slice(hs.data, int(hs.len))
			r.Headers = make([]Header, len(items))
			for i, h := range items {
				r.Headers[i] = Header{Name: C.GoString(h.name), Value: C.GoBytes(unsafe.Pointer(h.value), C.int(h.value_len))}
			}
		}
		C.meshshm_request_free(&req)
		C.meshshm_headers_free(&hs)
		return r, nil
	}
}

// Reply answers request id with status (StatusOK, or an error status), a
// message for the caller ("" for none) and body.
func (s *Server) Reply(id uint64, status uint32, message string, body []byte) error {
	var m *C.char
	if message != "" {
		m = cstr(message)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return &Error{Code: codeClosed, Message: "the server is closed"}
	}
	var msg *C.char
	var st C.uint32_t
	if rc := C.mshm_reply(s.s, C.uint64_t(id), C.int32_t(status), m, bytesPtr(body), C.size_t(len(body)), &msg, &st); rc < 0 {
		return cError(rc, msg, st)
	}
	return nil
}

// IsCancelled reports whether no one waits for the answer to request id any
// more: its caller timed out or went away (the proxy sent a cancel), or it
// was answered already. A long handler can check now and then and give up;
// a Reply to such a request is dropped. It never waits.
func (s *Server) IsCancelled(id uint64) (bool, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return false, &Error{Code: codeClosed, Message: "the server is closed"}
	}
	var msg *C.char
	var st C.uint32_t
	rc := C.mshm_is_cancelled(s.s, C.uint64_t(id), &msg, &st)
	if rc < 0 {
		return false, cError(rc, msg, st)
	}
	return rc == 1, nil
}

// Handler answers a request: a body, or an error. A *StatusError answers
// with its status and message; any other error answers StatusInternal.
type Handler func(ctx context.Context, req *Request) ([]byte, error)

// Serve answers requests with h until ctx is done (returns nil) or the
// proxy goes away (returns the error).
func (s *Server) Serve(ctx context.Context, h Handler) error {
	for {
		req, err := s.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		body, herr := h(ctx, req)
		var st *StatusError
		switch {
		case herr == nil:
			err = s.Reply(req.ID, StatusOK, "", body)
		case errors.As(herr, &st):
			err = s.Reply(req.ID, st.Status, st.Message, st.Body)
		default:
			err = s.Reply(req.ID, StatusInternal, herr.Error(), nil)
		}
		if err != nil {
			return err
		}
	}
}

// Close unregisters and disconnects (after a Next in progress returns).
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	C.meshshm_server_close(s.s)
	s.s = nil
	return nil
}
