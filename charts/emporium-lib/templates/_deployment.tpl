{{- define "emporium-lib.deployment" -}}
{{- $mesh := include "emporium-lib.meshEnabled" . -}}
{{- if and .Values.devReload (eq (include "emporium-lib.environment" .) "production") -}}
{{- fail "devReload (uvicorn reloading synced source) is for development only, not environment production" -}}
{{- end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  {{- if not .Values.autoscaling.enabled }}
  replicas: {{ .Values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 3
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "emporium-lib.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "emporium-lib.labels" . | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- if $mesh }}
        # Istio merges the app's /metrics into the sidecar's :15020/stats/prometheus (scraped without mTLS).
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ .Values.containerPort | quote }}
        prometheus.io/path: /metrics
        sidecar.istio.io/rewriteAppHTTPProbers: "true"
        {{- else }}
        # no mesh: no sidecar even in a namespace labelled for injection
        sidecar.istio.io/inject: "false"
        {{- end }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "emporium-lib.serviceAccountName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      {{- if .Values.devReload }}
      initContainers:
        # development only (devReload, skaffold dev): the app's packages, as installed in the image, copied into
        # the writable /app/dev that skaffold syncs saved .py files into
        - name: dev-source
          image: {{ include "emporium-lib.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            - python
            - -c
            - |
              import importlib.util, os, shutil
              for name in ({{ .Values.module | quote }}, "emporium_common"):
                  source = os.path.dirname(importlib.util.find_spec(name).origin)
                  # with the image's bytecode: valid for every file until skaffold syncs a newer one
                  shutil.copytree(source, f"/app/dev/{name}", dirs_exist_ok=True)
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: dev-source
              mountPath: /app/dev
      {{- end }}
      containers:
        - name: {{ include "emporium-lib.name" . }}
          image: {{ include "emporium-lib.image" . | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          # command (not args): independent of the image's ENTRYPOINT
          command: ["python", "-m", {{ .Values.module | quote }}, "serve"]
          ports:
            - name: http
              containerPort: {{ .Values.containerPort }}
              protocol: TCP
          env:
            {{- include "emporium-lib.env" . | nindent 12 }}
            {{- if .Values.devReload }}
            # development only: the synced copy first, and uvicorn reloading when a .py file under it changes
            - name: PYTHONPATH
              value: /app/dev
            - name: RELOAD_DIR
              value: /app/dev
            {{- end }}
          {{- with .Values.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- if .Values.shutdownDelaySeconds }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ .Values.shutdownDelaySeconds }}
          {{- end }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 2
            failureThreshold: {{ .Values.probes.startupFailureThreshold }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: {{ .Values.probes.periodSeconds }}
            timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: {{ .Values.probes.periodSeconds }}
            timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
            failureThreshold: 2
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if .Values.devReload }}
            - name: dev-source
              mountPath: /app/dev
            {{- end }}
            {{- with .Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if .Values.devReload }}
        - name: dev-source
          emptyDir:
            sizeLimit: 256Mi
        {{- end }}
        {{- with .Values.extraVolumes }}
        {{- tpl (toYaml .) $ | nindent 8 }}
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "emporium-lib.selectorLabels" . | nindent 14 }}
{{- end -}}

{{- define "emporium-lib.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "emporium-lib.selectorLabels" . | nindent 4 }}
  ports:
    - name: http
      port: {{ .Values.service.port }}
      targetPort: http
      protocol: TCP
      appProtocol: http
    {{- if include "emporium-lib.meshEnabled" . }}
    - name: http-metrics
      port: 15020
      targetPort: 15020
      protocol: TCP
    {{- end }}
{{- end -}}

{{- define "emporium-lib.serviceaccount" -}}
{{- if .Values.serviceAccount.create -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "emporium-lib.serviceAccountName" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
  {{- with .Values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end -}}
{{- end -}}

{{- define "emporium-lib.hpa" -}}
{{- if .Values.autoscaling.enabled -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "emporium-lib.fullname" . }}
  minReplicas: {{ .Values.autoscaling.minReplicas }}
  maxReplicas: {{ .Values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .Values.autoscaling.targetCPUUtilizationPercentage }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end -}}
{{- end -}}

{{- define "emporium-lib.pdb" -}}
{{- if .Values.podDisruptionBudget.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .Values.podDisruptionBudget.maxUnavailable }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "emporium-lib.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end -}}

{{- define "emporium-lib.networkpolicy" -}}
{{- if .Values.networkPolicy.enabled -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "emporium-lib.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    # The ingress gateway and in-cluster callers reach the HTTP port.
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ .Values.networkPolicy.gatewayNamespace }}
        {{- if .Values.networkPolicy.allowSameNamespace }}
        - podSelector: {}
        {{- end }}
      ports:
        - port: http
          protocol: TCP
    # Prometheus scrapes the app port directly (no mesh).
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ .Values.networkPolicy.monitoringNamespace }}
      ports:
        - port: http
          protocol: TCP
    {{- if include "emporium-lib.meshEnabled" . }}
    # The sidecar's agent: merged metrics (Prometheus) and the rewritten probes (kubelet, from the node).
    - ports:
        - port: 15020
          protocol: TCP
        - port: 15021
          protocol: TCP
    {{- end }}
{{- end -}}
{{- end -}}

{{- define "emporium-lib.servicemonitor" -}}
{{- if include "emporium-lib.serviceMonitorEnabled" . -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "emporium-lib.fullname" . }}
  labels:
    {{- include "emporium-lib.labels" . | nindent 4 }}
    {{- with .Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "emporium-lib.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames: [{{ .Release.Namespace | quote }}]
  endpoints:
    {{- if include "emporium-lib.meshEnabled" . }}
    - port: http-metrics
      path: /stats/prometheus
    {{- else }}
    - port: http
      path: /metrics
    {{- end }}
      interval: {{ .Values.metrics.serviceMonitor.interval }}
      scrapeTimeout: {{ .Values.metrics.serviceMonitor.scrapeTimeout }}
      # the app's own `service` label (emporium_http_requests_total{service=...}) wins over the target's
      honorLabels: true
{{- end -}}
{{- end -}}
