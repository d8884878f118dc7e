package meshshm

/*
#include "shim.h"
*/
import "C"

import (
	"strconv"
	"strings"
	"unsafe"
)

// Call priorities (WithPriority): low is shed first under overload.
const (
	PriorityLow    uint8 = 0
	PriorityNormal uint8 = 1 // the default
	PriorityHigh   uint8 = 2 // 2 and up are all high
)

// Header is a request header: a name (non-empty, no NUL) and a value of bytes.
type Header struct {
	Name  string
	Value []byte
}

// CallOption sets how a call is made besides its body: WithHeader,
// WithPriority. (Its timeout is the context's deadline.)
type CallOption func(*callOptions)

type callOptions struct {
	priority uint8
	headers  []Header
}

// WithHeader adds a request header (names may repeat; order is kept).
func WithHeader(name string, value []byte) CallOption {
	return func(o *callOptions) { o.headers = append(o.headers, Header{Name: name, Value: value}) }
}

// WithHeaders adds request headers, in order.
func WithHeaders(hs ...Header) CallOption {
	return func(o *callOptions) { o.headers = append(o.headers, hs...) }
}

// WithPriority sets the call's priority: PriorityLow, PriorityNormal (the
// default) or PriorityHigh.
func WithPriority(p uint8) CallOption {
	return func(o *callOptions) { o.priority = p }
}

// cOptions is a meshshm_call_options in C memory terms: its header array and
// strings are C-allocated (cgo forbids passing Go memory that holds Go
// pointers); free releases them once the C call has returned.
type cOptions struct {
	o    C.meshshm_call_options
	mem  []unsafe.Pointer
	harr *C.meshshm_header
}

func newCOptions(opts []CallOption, timeout C.uint32_t) (*cOptions, error) {
	o := callOptions{priority: PriorityNormal}
	for _, f := range opts {
		f(&o)
	}
	for _, h := range o.headers {
		if strings.IndexByte(h.Name, 0) >= 0 {
			return nil, &Error{Code: codeInvalidArgument, Message: "header name " + strconv.Quote(h.Name) + " contains a NUL byte"}
		}
	}
	co := &cOptions{}
	C.mshm_options_init(&co.o)
	co.o.timeout_ms = timeout
	co.o.priority = C.uint8_t(o.priority)
	if n := len(o.headers); n > 0 {
		co.harr = (*C.meshshm_header)(C.calloc(C.size_t(n), C.size_t(unsafe.Sizeof(C.meshshm_header{}))))
		hs := unsafe.Slice(co.harr, n)
		for i, h := range o.headers {
			name := C.CString(h.Name) // the library refuses an empty name
			co.mem = append(co.mem, unsafe.Pointer(name))
			hs[i].name = name
			if len(h.Value) > 0 {
				v := C.CBytes(h.Value)
				co.mem = append(co.mem, v)
				hs[i].value = (*C.uint8_t)(v)
			}
			hs[i].value_len = C.size_t(len(h.Value))
		}
		co.o.headers = co.harr
		co.o.headers_len = C.size_t(n)
	}
	return co, nil
}

func (co *cOptions) free() {
	for _, p := range co.mem {
		C.free(p)
	}
	co.mem = nil
	if co.harr != nil {
		C.free(unsafe.Pointer(co.harr))
		co.harr = nil
	}
}
