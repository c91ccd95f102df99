package events

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/hyphae-run/hyphae/errcode"
)

// Subscription delivers one run's events in order, from a starting point
// through the completed event. Each subscription has its own consumer on
// the server and its own bounded buffer: a reader that falls behind only
// stops its own consumer from pulling (the events wait in the stream), so
// it slows neither the run's writer nor other readers.
type Subscription struct {
	ch     chan Event
	cancel context.CancelFunc
	done   chan struct{}
	err    error // set before done is closed
	ended  bool  // the run had completed at or before the starting point
}

// Ended reports that there is nothing to deliver: the run had already
// completed at or before the point the subscription started from (a
// client resuming after the last event).
func (s *Subscription) Ended() bool { return s.ended }

// Events returns the channel of events. It is closed after the completed
// event, when the subscription's context ends, on Close, or on failure
// (see Err).
func (s *Subscription) Events() <-chan Event { return s.ch }

// Err tells, once Events is closed, why: nil after the completed event,
// the context's error after cancellation or Close, a coded error when the
// log failed.
func (s *Subscription) Err() error {
	<-s.done
	return s.err
}

// Close ends the subscription and waits until its consumer is stopped.
func (s *Subscription) Close() {
	s.cancel()
	<-s.done
}

// Subscribe returns a subscription to runID's events with a sequence
// greater than afterSeq: everything already stored, then live events as
// they are appended, then nothing after the completed event. A run that
// has no events yet is not an error: the subscription waits for them.
//
// Replay and live tail are one ordered consumer filtered on the run's
// subject, starting at the stream sequence of the first event after
// afterSeq. The ordered consumer checks every delivery's consumer sequence
// and recreates itself from the last stream sequence it delivered when one
// is missing, so the events come without gap or duplicate; events are
// also checked against their per-run sequence as a second guard.
func (l *Log) Subscribe(ctx context.Context, runID string, afterSeq uint64) (*Subscription, error) {
	if err := checkRunID(runID); err != nil {
		return nil, err
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects:   []string{subject(runID)},
		DeliverPolicy:    jetstream.DeliverAllPolicy,
		MaxResetAttempts: subscriberResetAttempts,
	}
	if afterSeq > 0 {
		start, finished, err := l.startSeq(ctx, runID, afterSeq)
		if err != nil {
			return nil, err
		}
		if finished {
			return endedSubscription(), nil
		}
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
	}
	cons, err := l.js.OrderedConsumer(ctx, StreamName, cfg)
	if err != nil {
		return nil, errcode.Wrap(errcode.EventLogFailed, err, "creating a consumer for run %s", runID)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(l.opts.SubscriberBuffer))
	if err != nil {
		return nil, errcode.Wrap(errcode.EventLogFailed, err, "subscribing to run %s", runID)
	}

	subCtx, cancel := context.WithCancel(ctx)
	stopRoot := context.AfterFunc(l.root, cancel)
	s := &Subscription{
		ch:     make(chan Event, l.opts.SubscriberBuffer),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	l.subs.Add(1)
	go func() {
		defer l.subs.Done()
		defer close(s.done)
		defer close(s.ch)
		defer stopRoot()
		defer it.Stop()
		defer cancel()
		s.err = l.pump(subCtx, runID, afterSeq, it, s.ch)
	}()
	return s, nil
}

// Bounds of the wait in pump's polling loop.
const (
	minPollWait = 20 * time.Millisecond
	maxPollWait = time.Second
)

// pump moves events from the consumer to the subscriber's channel until
// the completed event, the end of ctx, or a failure.
//
// It polls with a bounded wait instead of blocking in Next, to work around
// a race in nats.go's pull iterator (v1.56): Next asks for more messages
// only when it is called, and skips the request while the previous one is
// still being sent; when the messages of that request are all consumed
// before the send returns (the in-process server answers at once), the
// blocked Next never asks again and the stream stalls until the missing
// heartbeat is noticed (10 s). Each timed-out Next re-runs the check. The
// wait starts short after each event, when the race can strike, and grows
// while the run is quiet so that idle subscribers cost little.
func (l *Log) pump(ctx context.Context, runID string, last uint64, it jetstream.MessagesContext, out chan<- Event) error {
	stop := context.AfterFunc(ctx, it.Stop) // wakes a waiting Next at once
	defer stop()
	wait := minPollWait
	for {
		msg, err := it.Next(jetstream.NextMaxWait(wait))
		if errors.Is(err, nats.ErrTimeout) && ctx.Err() == nil {
			wait = min(2*wait, maxPollWait)
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return errcode.Wrap(errcode.EventLogFailed, err, "reading events of run %s", runID)
		}
		wait = minPollWait
		ev, err := decode(runID, msg.Headers(), msg.Data())
		if err != nil {
			// Something other than a Log published on the run's subject;
			// the stream stays readable past it.
			l.log.Warn("skipping an undecodable event", "run", runID, "err", err)
			continue
		}
		if ev.Seq <= last {
			// Only reachable when afterSeq is beyond the run's end, or if a
			// second writer slipped past the server's check.
			continue
		}
		if last != 0 && ev.Seq != last+1 {
			l.log.Warn("gap in a run's event sequence (older events expired?)", "run", runID, "after", last, "got", ev.Seq)
		}
		last = ev.Seq
		select {
		case out <- ev:
		case <-ctx.Done():
			return ctx.Err()
		}
		if ev.IsCompleted() {
			return nil
		}
	}
}

// endedSubscription is the subscription of a reader that resumes after a
// run's completed event: there is nothing more to send.
func endedSubscription() *Subscription {
	s := &Subscription{ch: make(chan Event), cancel: func() {}, done: make(chan struct{}), ended: true}
	close(s.ch)
	close(s.done)
	return s
}

// startSeq returns the stream sequence to start a run's consumer at so that
// its first delivery is the run's first event with a per-run sequence
// greater than afterSeq, or the next event appended when there is none yet;
// finished reports that the run completed at or before afterSeq.
//
// The per-run sequence of "the run's first message at or after stream
// sequence s" never decreases as s grows, so a binary search over the
// stream's sequences finds the start in O(log n) message lookups, each one
// served from the server's per-subject index. The common case, a reader
// resuming at the end, is answered by the run's last message alone.
// Events appended during the lookups land after the searched range (the
// stream's last sequence is read first) and are delivered live.
func (l *Log) startSeq(ctx context.Context, runID string, afterSeq uint64) (start uint64, finished bool, err error) {
	info, err := l.stream.Info(ctx)
	if err != nil {
		return 0, false, errcode.Wrap(errcode.EventLogFailed, err, "reading stream %s", StreamName)
	}
	subj := subject(runID)
	lo, hi := max(info.State.FirstSeq, 1), info.State.LastSeq+1
	lastRaw, err := l.stream.GetLastMsgForSubject(ctx, subj)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return hi, false, nil
	case err != nil:
		return 0, false, errcode.Wrap(errcode.EventLogFailed, err, "looking up events of run %s", runID)
	}
	last, err := decode(runID, lastRaw.Header, lastRaw.Data)
	if err != nil {
		return 0, false, err
	}
	if last.Seq <= afterSeq {
		return max(hi, lastRaw.Sequence+1), last.IsCompleted(), nil
	}
	// Invariant: every message of the run below lo has a per-run sequence
	// <= afterSeq, and the answer lies in [lo, hi].
	hi = lastRaw.Sequence
	for lo < hi {
		mid := lo + (hi-lo)/2
		raw, err := l.stream.GetMsg(ctx, mid, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			hi = mid
			continue
		}
		if err != nil {
			return 0, false, errcode.Wrap(errcode.EventLogFailed, err, "looking up events of run %s", runID)
		}
		ev, err := decode(runID, raw.Header, raw.Data)
		if err != nil {
			return 0, false, err
		}
		if ev.Seq > afterSeq {
			hi = mid
		} else {
			lo = raw.Sequence + 1
		}
	}
	return lo, false, nil
}
