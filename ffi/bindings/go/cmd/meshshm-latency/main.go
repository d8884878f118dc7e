// Command meshshm-latency measures the median round trip of a 1 KiB echo
// call from Go:  meshshm-latency -s SOCKET [-n CALLS]
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	meshshm "example.invalid/meshshm/ffi/bindings/go"
)

func main() {
	sock := flag.String("s", "", "proxy socket")
	calls := flag.Int("n", 2000, "calls")
	flag.Parse()
	c, err := meshshm.Dial(*sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer c.Close()
	body := bytes.Repeat([]byte("x"), 1024)
	measure := func(name string, ctx func() (context.Context, context.CancelFunc)) {
		t := make([]float64, *calls)
		for i := -*calls / 10; i < *calls; i++ {
			cx, cancel := ctx()
			t0 := time.Now()
			_, err := c.Call(cx, "echo", "Echo", body)
			dt := time.Since(t0)
			cancel()
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			if i >= 0 {
				t[i] = float64(dt.Nanoseconds()) / 1000
			}
		}
		sort.Float64s(t)
		fmt.Printf("go (%s): %d calls of 1024 B: median %.1f us, p99 %.1f us\n", name, *calls, t[*calls/2], t[*calls*99/100])
	}
	measure("context.Background, blocking cgo call", func() (context.Context, context.CancelFunc) {
		return context.Background(), func() {}
	})
	measure("context.WithTimeout, async + netpoller", func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 5*time.Second)
	})
}
