package meshshm

/*
#cgo pkg-config: meshshm
#include "shim.h"
*/
import "C"

import (
	"context"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Client is a connection to the meshshm sidecar proxy for outbound calls.
// It is safe for concurrent use by many goroutines; share one per process.
type Client struct {
	mu     sync.RWMutex // read: a use of c; write: Close
	c      *C.meshshm_client
	closed bool

	asyncOnce sync.Once
	asyncErr  error
	pendMu    sync.Mutex
	pending   map[uint64]chan result
	nextID    uint64
	fdFile    *os.File
	done      chan struct{}
}

type result struct {
	body []byte
	err  error
}

// cstr is s as a NUL-terminated byte slice (passed to C for the duration of a call).
func cstr(s string) *C.char {
	b := make([]byte, len(s)+1)
	copy(b, s)
	return (*C.char)(unsafe.Pointer(&b[0]))
}

func bytesPtr(b []byte) unsafe.Pointer {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Pointer(&b[0])
}

// Dial connects to the proxy over shared memory. socketPath "" means the
// default ($MESHSHM_SOCKET, $XDG_RUNTIME_DIR/meshshm/proxy.sock or
// /tmp/meshshm-<uid>/proxy.sock). A proxy that is not running gives an
// error matching ErrConnect.
func Dial(socketPath string) (*Client, error) {
	var path *C.char
	if socketPath != "" {
		path = cstr(socketPath)
	}
	var c *C.meshshm_client
	var msg *C.char
	var status C.uint32_t
	if rc := C.mshm_connect(path, &c, &msg, &status); rc < 0 {
		return nil, cError(rc, msg, status)
	}
	return &Client{c: c, pending: map[uint64]chan result{}}, nil
}

// Call calls service/method with body and returns the response body.
//
// The context bounds the call: its deadline becomes the call's timeout
// (the proxy learns it too), and cancelling it cancels the call. Errors:
// *StatusError when the service answers an error status (errors.Is(err,
// ErrStatus)); on timeout an *Error matching both ErrTimeout and
// context.DeadlineExceeded; ctx.Err() when the context is cancelled.
//
// A context that can never be cancelled (context.Background()) takes the
// direct path: one blocking cgo call, no goroutine hop.
//
// Options add request headers and a priority:
//
//	cl.Call(ctx, "svc", "Get", body, meshshm.WithHeader("x-trace", id), meshshm.WithPriority(meshshm.PriorityHigh))
func (cl *Client) Call(ctx context.Context, service, method string, body []byte, opts ...CallOption) ([]byte, error) {
	if ctx.Done() == nil {
		return cl.callBlocking(service, method, body, 0, opts)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return cl.callAsync(ctx, service, method, body, opts)
}

func timeoutMs(ctx context.Context) (C.uint32_t, bool) {
	d, ok := ctx.Deadline()
	if !ok {
		return 0, true
	}
	left := time.Until(d)
	if left <= 0 {
		return 0, false
	}
	ms := (left + time.Millisecond - 1) / time.Millisecond
	if ms > 0xFFFFFFFF {
		ms = 0xFFFFFFFF
	}
	return C.uint32_t(ms), true
}

func (cl *Client) callBlocking(service, method string, body []byte, timeout C.uint32_t, opts []CallOption) ([]byte, error) {
	cl.mu.RLock()
	defer cl.mu.RUnlock()
	if cl.closed {
		return nil, &Error{Code: codeClosed, Message: "the client is closed"}
	}
	var resp C.meshshm_buffer
	var msg *C.char
	var status C.uint32_t
	var rc C.int
	if len(opts) == 0 {
		rc = C.mshm_call(cl.c, cstr(service), cstr(method), bytesPtr(body), C.size_t(len(body)), timeout, &resp, &msg, &status)
	} else {
		co, err := newCOptions(opts, timeout)
		if err != nil {
			return nil, err
		}
		rc = C.mshm_call_opts(cl.c, cstr(service), cstr(method), bytesPtr(body), C.size_t(len(body)), &co.o, &resp, &msg, &status)
		co.free()
	}
	if rc < 0 {
		return nil, cError(rc, msg, status)
	}
	out := C.GoBytes(unsafe.Pointer(resp.data), C.int(resp.len))
	C.meshshm_buffer_free(&resp)
	return out, nil
}

// startAsync sets up the completion side: a goroutine that waits on the
// library's eventfd through Go's netpoller and hands out completions.
func (cl *Client) startAsync() error {
	cl.asyncOnce.Do(func() {
		var msg *C.char
		var status C.uint32_t
		fd := C.mshm_fd(cl.c, &msg, &status)
		if fd < 0 {
			cl.asyncErr = cError(fd, msg, status)
			return
		}
		// A duplicate for the netpoller: the library owns (and closes) its fd.
		dup, err := syscall.Dup(int(fd))
		if err != nil {
			cl.asyncErr = &Error{Code: int(C.MESHSHM_ERR_SYSTEM), Message: "dup: " + err.Error()}
			return
		}
		syscall.CloseOnExec(dup)
		if err := syscall.SetNonblock(dup, true); err != nil {
			syscall.Close(dup)
			cl.asyncErr = &Error{Code: int(C.MESHSHM_ERR_SYSTEM), Message: "nonblock: " + err.Error()}
			return
		}
		cl.fdFile = os.NewFile(uintptr(dup), "meshshm-completions")
		cl.done = make(chan struct{})
		go cl.dispatch()
	})
	return cl.asyncErr
}

const batch = 64

func (cl *Client) dispatch() {
	defer close(cl.done)
	raw, err := cl.fdFile.SyscallConn()
	if err != nil {
		return
	}
	size := C.size_t(unsafe.Sizeof(C.meshshm_completion{}))
	arr := (*C.meshshm_completion)(C.calloc(batch, size))
	defer C.free(unsafe.Pointer(arr))
	done := unsafe.Slice(arr, batch)
	for {
		// Read calls the function at once and again each time the fd turns
		// readable, until it returns true.
		err := raw.Read(func(uintptr) bool {
			cl.mu.RLock()
			if cl.closed {
				cl.mu.RUnlock()
				return true
			}
			n := int(C.meshshm_client_poll(cl.c, arr, batch, 0))
			cl.mu.RUnlock()
			for i := 0; i < n; i++ {
				cl.deliver(&done[i])
			}
			return n > 0
		})
		if err != nil {
			return // the fd was closed: the client is closing
		}
		cl.mu.RLock()
		closed := cl.closed
		cl.mu.RUnlock()
		if closed {
			return
		}
	}
}

func (cl *Client) deliver(d *C.meshshm_completion) {
	defer C.meshshm_completion_free(d)
	cl.pendMu.Lock()
	ch, ok := cl.pending[uint64(d.user_data)]
	delete(cl.pending, uint64(d.user_data))
	cl.pendMu.Unlock()
	if !ok {
		return
	}
	body := C.GoBytes(unsafe.Pointer(d.body.data), C.int(d.body.len))
	if d.result == 0 {
		ch <- result{body: body}
		return
	}
	ch <- result{err: makeError(d.result, C.GoString(d.error), uint32(d.status), body)}
}

func (cl *Client) callAsync(ctx context.Context, service, method string, body []byte, opts []CallOption) ([]byte, error) {
	timeout, ok := timeoutMs(ctx)
	if !ok {
		return nil, context.DeadlineExceeded
	}
	cl.mu.RLock()
	if cl.closed {
		cl.mu.RUnlock()
		return nil, &Error{Code: codeClosed, Message: "the client is closed"}
	}
	if err := cl.startAsync(); err != nil {
		cl.mu.RUnlock()
		return nil, err
	}
	ch := make(chan result, 1)
	cl.pendMu.Lock()
	cl.nextID++
	uid := cl.nextID
	cl.pending[uid] = ch
	cl.pendMu.Unlock()
	var callID C.uint64_t
	var msg *C.char
	var status C.uint32_t
	var rc C.int
	if len(opts) == 0 {
		rc = C.mshm_send(cl.c, cstr(service), cstr(method), bytesPtr(body), C.size_t(len(body)), timeout,
			C.uint64_t(uid), &callID, &msg, &status)
	} else {
		co, err := newCOptions(opts, timeout)
		if err != nil {
			cl.mu.RUnlock()
			cl.pendMu.Lock()
			delete(cl.pending, uid)
			cl.pendMu.Unlock()
			return nil, err
		}
		rc = C.mshm_send_opts(cl.c, cstr(service), cstr(method), bytesPtr(body), C.size_t(len(body)), &co.o,
			C.uint64_t(uid), &callID, &msg, &status)
		co.free() // the library copied what it needs
	}
	cl.mu.RUnlock()
	if rc < 0 {
		cl.pendMu.Lock()
		delete(cl.pending, uid)
		cl.pendMu.Unlock()
		return nil, cError(rc, msg, status)
	}
	select {
	case r := <-ch:
		return r.body, r.err
	case <-cl.done:
		return nil, &Error{Code: codeClosed, Message: "the client is closed"}
	case <-ctx.Done():
		cl.pendMu.Lock()
		_, still := cl.pending[uid]
		delete(cl.pending, uid)
		cl.pendMu.Unlock()
		if still {
			cl.mu.RLock()
			if !cl.closed {
				C.meshshm_client_cancel(cl.c, callID)
			}
			cl.mu.RUnlock()
		} else {
			// Delivered meanwhile: prefer the answer.
			select {
			case r := <-ch:
				return r.body, r.err
			default:
			}
		}
		return nil, ctx.Err()
	}
}

// Close closes the client; calls in progress finish first, pending
// context-bound calls fail with ErrClosed.
func (cl *Client) Close() error {
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		return nil
	}
	cl.closed = true
	f := cl.fdFile
	cl.mu.Unlock()
	if f != nil {
		f.Close() // wakes the dispatcher
		<-cl.done
	}
	C.meshshm_client_close(cl.c)
	cl.c = nil
	return nil
}

// LibraryVersion is the version of the linked libmeshshm.
func LibraryVersion() string { return C.GoString(C.meshshm_version()) }
