package io.meshshm;

import com.sun.jna.Pointer;
import java.util.concurrent.locks.ReentrantReadWriteLock;
import java.util.function.Consumer;

/**
 * A C handle shared by many threads: uses hold the read lock; {@link #close} takes the write lock,
 * so the C close runs after every use has returned (as the C API requires).
 */
final class Guard {
    private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
    private final String what;
    private final Consumer<Pointer> release;
    private volatile Pointer ptr;

    Guard(Pointer ptr, Consumer<Pointer> release, String what) {
        this.ptr = ptr;
        this.release = release;
        this.what = what;
    }

    /** Start a use; pair with {@link #exit()}. */
    Pointer enter() {
        lock.readLock().lock();
        Pointer p = ptr;
        if (p == null) {
            lock.readLock().unlock();
            throw new MeshshmException.Closed("the " + what + " is closed");
        }
        return p;
    }

    void exit() {
        lock.readLock().unlock();
    }

    boolean isClosed() {
        return ptr == null;
    }

    void close() {
        lock.writeLock().lock();
        try {
            Pointer p = ptr;
            ptr = null;
            if (p != null) {
                release.accept(p);
            }
        } finally {
            lock.writeLock().unlock();
        }
    }
}
