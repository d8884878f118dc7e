package meshshm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var sock string

// TestMain starts the real meshshm-proxy ($MESHSHM_PROXY) on a socket in a
// temporary directory for the whole package, and stops it afterwards.
func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	bin := os.Getenv("MESHSHM_PROXY")
	if bin == "" {
		bin, _ = filepath.Abs("../../../target/debug/meshshm-proxy")
	}
	dir, err := os.MkdirTemp("", "meshshm-go-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	sock = filepath.Join(dir, "proxy.sock")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	logf, _ := os.Create(filepath.Join(dir, "proxy.log"))
	cmd := exec.Command(bin, "--socket", sock, "--tcp", fmt.Sprintf("127.0.0.1:%d", port))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "start the proxy (%s; set MESHSHM_PROXY): %v\n", bin, err)
		return 1
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := Dial(sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "proxy.log"))
			fmt.Fprintf(os.Stderr, "the proxy did not come up: %v\n%s", err, log)
			return 1
		}
		time.Sleep(50 * time.Millisecond)
	}
	return m.Run()
}

func dial(t *testing.T) *Client {
	t.Helper()
	c, err := Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestEchoRoundTrip(t *testing.T) {
	c := dial(t)
	for _, size := range []int{0, 1, 1024, 64 << 10, 1 << 20, 5 << 20} {
		body := make([]byte, size)
		rand.New(rand.NewSource(int64(size))).Read(body)
		// Both paths: a context with a deadline (async) and Background (blocking).
		got, err := c.Call(ctxFor(t, 10*time.Second), "echo", "Echo", body)
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("size %d (ctx): err %v, got %d bytes", size, err, len(got))
		}
		got, err = c.Call(context.Background(), "echo", "Echo", body)
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("size %d (background): err %v, got %d bytes", size, err, len(got))
		}
	}
}

func TestUnknownService(t *testing.T) {
	c := dial(t)
	for _, ctx := range []context.Context{context.Background(), ctxFor(t, 5*time.Second)} {
		_, err := c.Call(ctx, "no-such-service", "Get", []byte("x"))
		var st *StatusError
		if !errors.As(err, &st) || st.Status != StatusNotFound || !errors.Is(err, ErrStatus) {
			t.Fatalf("want a not-found StatusError, got %#v", err)
		}
		if StatusName(st.Status) != "not found" {
			t.Fatal(StatusName(st.Status))
		}
	}
}

func TestTimeoutAgainstSilentGoServer(t *testing.T) {
	srv, err := Bind(sock, "go-silent")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c := dial(t)
	start := time.Now()
	_, err = c.Call(ctxFor(t, 200*time.Millisecond), "go-silent", "Wait", nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want a deadline error, got %#v", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("the timeout did not end the call")
	}
	// Cancellation without a deadline.
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(100 * time.Millisecond); cancel() }()
	if _, err := c.Call(ctx, "go-silent", "Wait", nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %#v", err)
	}
}

func TestProxyNotRunning(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nobody.sock")
	_, err := Dial(path)
	if !errors.Is(err, ErrConnect) || !strings.Contains(err.Error(), "nobody.sock") {
		t.Fatalf("want ErrConnect, got %#v", err)
	}
	if _, err := Bind(path, "svc"); !errors.Is(err, ErrConnect) {
		t.Fatalf("want ErrConnect, got %#v", err)
	}
}

func TestConcurrentGoroutines(t *testing.T) {
	c := dial(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				body := []byte(fmt.Sprintf("goroutine %d call %d", g, i))
				ctx := context.Background()
				if i%2 == 1 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
					defer cancel()
				}
				got, err := c.Call(ctx, "echo", "Echo", body)
				if err != nil || !bytes.Equal(got, body) {
					errs <- fmt.Errorf("goroutine %d call %d: %v %q", g, i, err, got)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestGoServerGoClient(t *testing.T) {
	srv, err := Bind(sock, "go-upper")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(ctx, func(_ context.Context, r *Request) ([]byte, error) {
			switch r.Method {
			case "fail":
				return nil, &StatusError{Status: StatusPermissionDenied, Message: "not you"}
			case "boom":
				return nil, errors.New("handler exploded")
			}
			return append([]byte("go:"), bytes.ToUpper(r.Body)...), nil
		})
	}()
	c := dial(t)
	got, err := c.Call(ctxFor(t, 5*time.Second), "go-upper", "Up", []byte("hello"))
	if err != nil || string(got) != "go:HELLO" {
		t.Fatalf("%v %q", err, got)
	}
	_, err = c.Call(context.Background(), "go-upper", "fail", nil)
	var st *StatusError
	if !errors.As(err, &st) || st.Status != StatusPermissionDenied || !strings.Contains(st.Message, "not you") {
		t.Fatalf("%#v", err)
	}
	_, err = c.Call(context.Background(), "go-upper", "boom", nil)
	if !errors.As(err, &st) || st.Status != StatusInternal || !strings.Contains(st.Message, "exploded") {
		t.Fatalf("%#v", err)
	}
	stop()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

func TestClosedClient(t *testing.T) {
	c, err := Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := c.Call(context.Background(), "echo", "Echo", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("%#v", err)
	}
	c.Close()
}

func TestLibraryVersion(t *testing.T) {
	if LibraryVersion() != "0.1.0" {
		t.Fatal(LibraryVersion())
	}
}

// describe answers with what reached the server: "priority|name=value|...".
func describe(_ context.Context, r *Request) ([]byte, error) {
	out := []byte(fmt.Sprint(r.Priority))
	for _, h := range r.Headers {
		out = append(append(append(append(out, '|'), h.Name...), '='), h.Value...)
	}
	return out, nil
}

func TestHeadersAndPriorityReachTheServer(t *testing.T) {
	srv, err := Bind(sock, "go-describe")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, describe) }()
	c := dial(t)
	for _, tc := range []struct {
		name string
		ctx  context.Context
		opts []CallOption
		want string
	}{
		{"blocking, high, two headers", context.Background(),
			[]CallOption{WithPriority(PriorityHigh), WithHeader("x-trace", []byte("abc")), WithHeader("x-bin", []byte("a\x00b"))},
			"2|x-trace=abc|x-bin=a\x00b"},
		{"deadline (async path), low", ctxFor(t, 5*time.Second),
			[]CallOption{WithPriority(PriorityLow), WithHeaders(Header{"k", nil}, Header{"k", []byte("v")})},
			"0|k=|k=v"},
		{"no options: normal", context.Background(), nil, "1"},
		{"no options, deadline: normal", ctxFor(t, 5*time.Second), nil, "1"},
	} {
		got, err := c.Call(tc.ctx, "go-describe", "M", nil, tc.opts...)
		if err != nil || string(got) != tc.want {
			t.Errorf("%s: %v %q, want %q", tc.name, err, got, tc.want)
		}
	}
	if _, err := c.Call(context.Background(), "go-describe", "M", nil, WithHeader("", []byte("v"))); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("an empty header name: %#v", err)
	}
	if _, err := c.Call(ctxFor(t, 5*time.Second), "go-describe", "M", nil, WithHeader("a\x00b", nil)); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("a NUL in a header name: %#v", err)
	}
	stop()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

func TestRequestHeaderAccessor(t *testing.T) {
	srv, err := Bind(sock, "go-hdr")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c := dial(t)
	answer := make(chan error, 1)
	go func() {
		_, err := c.Call(ctxFor(t, 5*time.Second), "go-hdr", "M", nil, WithHeader("a", []byte("1")), WithHeader("a", []byte("2")))
		answer <- err
	}()
	req, err := srv.Next(ctxFor(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := req.Header("a"); !ok || string(v) != "1" || len(req.Headers) != 2 {
		t.Errorf("headers %+v", req.Headers)
	}
	if _, ok := req.Header("b"); ok {
		t.Error("a header that was not sent")
	}
	if req.Priority != PriorityNormal {
		t.Errorf("priority %d", req.Priority)
	}
	if err := srv.Reply(req.ID, StatusOK, "", []byte("ok")); err != nil {
		t.Fatal(err)
	}
	if err := <-answer; err != nil {
		t.Fatal(err)
	}
}

func TestIsCancelledAfterTheCallerTimesOut(t *testing.T) {
	srv, err := Bind(sock, "go-hold")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if cancelled, err := srv.IsCancelled(987654321); err != nil || !cancelled {
		t.Fatalf("an id never handed out: %v %v", cancelled, err)
	}
	c := dial(t)
	slow := make(chan error, 1)
	go func() {
		_, err := c.Call(ctxFor(t, time.Second), "go-hold", "Slow", nil)
		slow <- err
	}()
	req, err := srv.Next(ctxFor(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if cancelled, err := srv.IsCancelled(req.ID); err != nil || cancelled {
		t.Fatalf("while the caller waits: %v %v", cancelled, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	cancelled := false
	for !cancelled && time.Now().Before(deadline) {
		if cancelled, err = srv.IsCancelled(req.ID); err != nil {
			t.Fatal(err)
		}
		if !cancelled {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if !cancelled {
		t.Fatal("not cancelled 10 s after the caller's 1 s timeout")
	}
	if err := <-slow; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the caller: %#v", err)
	}
	if err := srv.Reply(req.ID, StatusOK, "", []byte("late")); err != nil { // dropped, not an error
		t.Fatal(err)
	}

	fast := make(chan []byte, 1)
	go func() {
		b, _ := c.Call(ctxFor(t, 5*time.Second), "go-hold", "Fast", nil)
		fast <- b
	}()
	req, err = srv.Next(ctxFor(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if cancelled, _ := srv.IsCancelled(req.ID); cancelled {
		t.Fatal("cancelled while the caller waits")
	}
	if err := srv.Reply(req.ID, StatusOK, "", []byte("ok")); err != nil {
		t.Fatal(err)
	}
	if cancelled, _ := srv.IsCancelled(req.ID); !cancelled {
		t.Fatal("not cancelled once answered")
	}
	if b := <-fast; string(b) != "ok" {
		t.Fatalf("%q", b)
	}
}
