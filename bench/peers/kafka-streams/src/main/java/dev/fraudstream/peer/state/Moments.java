package dev.fraudstream.peer.state;

/** Running mean and variance (Welford). */
public final class Moments {
    public long n;
    public double mean;
    public double m2;

    /**
     * Adds {@code x}, unless that would make the statistics infinite or NaN: one absurd value
     * must not blind every later z-score (fraudstream's rule).
     */
    public void add(double x) {
        long n1 = n + 1;
        double d = x - mean;
        double mean1 = mean + d / n1;
        double m21 = m2 + d * (x - mean1);
        if (Double.isFinite(mean1) && Double.isFinite(m21)) {
            n = n1;
            mean = mean1;
            m2 = m21;
        }
    }

    /** Sample standard deviation; 0 with fewer than two values. */
    public double sd() {
        return n < 2 ? 0.0 : Math.sqrt(m2 / (n - 1));
    }
}
