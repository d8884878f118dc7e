// Package meshshm calls services through the meshshm sidecar proxy over
// shared memory, by linking libmeshshm (cgo; found with pkg-config).
//
//	client, err := meshshm.Dial("") // the default socket
//	if err != nil { ... }           // errors.Is(err, meshshm.ErrConnect): no proxy
//	defer client.Close()
//	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
//	defer cancel()
//	reply, err := client.Call(ctx, "echo", "Echo", []byte("hi"))
//
// A server:
//
//	srv, err := meshshm.Bind("", "greeter")
//	defer srv.Close()
//	srv.Serve(ctx, func(ctx context.Context, r *meshshm.Request) ([]byte, error) {
//		return append([]byte("hello, "), r.Body...), nil
//	})
package meshshm
